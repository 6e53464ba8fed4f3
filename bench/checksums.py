"""Checksum candidates for manifest.json, side by side in one run: GB/s on one core over a
256 MB buffer (fresh random bytes, warm in memory), repetitions interleaved A B C ... A B C.

    python -m bench.checksums [--mb 256] [--reps 5]

Prints a markdown table (median and min-max GB/s per candidate, and against memcpy), which
bench/results.md quotes with this command."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import zlib

import numpy as np


def candidates() -> dict:
    """{name: fn(buffer) -> digest} of every candidate installed here."""
    found = {"zlib.crc32 (CRC-32)": lambda b: zlib.crc32(b)}
    try:
        import google_crc32c
        found[f"google-crc32c (CRC-32C, impl {google_crc32c.implementation})"] = (
            lambda b: google_crc32c.extend(0, np.asarray(b)))  # a memoryview is refused
    except ImportError:
        pass
    try:
        import crc32c
        found["crc32c (CRC-32C)"] = lambda b: crc32c.crc32c(b)
    except ImportError:
        pass
    try:
        import xxhash
        found["xxhash xxh3_64"] = lambda b: xxhash.xxh3_64_intdigest(b)
        found["xxhash xxh64"] = lambda b: xxhash.xxh64_intdigest(b)
    except ImportError:
        pass
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    data = np.frombuffer(os.urandom(args.mb << 20), dtype=np.uint8)
    out = np.empty_like(data)
    view = memoryview(data)
    funcs = {"memcpy (numpy copyto)": lambda b: np.copyto(out, data), **candidates()}
    times = {name: [] for name in funcs}
    for _ in range(args.reps):
        for name, fn in funcs.items():
            t0 = time.perf_counter()
            fn(view)
            times[name].append(time.perf_counter() - t0)
    gbs = {n: [data.nbytes / t / 1e9 for t in ts] for n, ts in times.items()}
    memcpy = statistics.median(gbs["memcpy (numpy copyto)"])
    print(f"{args.mb} MB buffer, {args.reps} interleaved repetitions, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| candidate | GB/s median (min-max) | / memcpy |")
    print("|---|---|---|")
    for name, xs in gbs.items():
        med = statistics.median(xs)
        print(f"| {name} | {med:.2f} ({min(xs):.2f}-{max(xs):.2f}) | {med / memcpy:.2f} |")


if __name__ == "__main__":
    main()
