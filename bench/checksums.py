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


def measure(mb: int = 256, reps: int = 5) -> list[dict]:
    """[{name, gbs: [GB/s per repetition]}], memcpy first, repetitions interleaved."""
    data = np.frombuffer(os.urandom(mb << 20), dtype=np.uint8)
    out = np.empty_like(data)
    view = memoryview(data)
    funcs = {"memcpy (numpy copyto)": lambda b: np.copyto(out, data), **candidates()}
    times = {name: [] for name in funcs}
    for _ in range(reps):
        for name, fn in funcs.items():
            t0 = time.perf_counter()
            fn(view)
            times[name].append(time.perf_counter() - t0)
    return [{"name": n, "gbs": [data.nbytes / t / 1e9 for t in ts]} for n, ts in times.items()]


def table(rows: list[dict]) -> list[str]:
    """The markdown table of `measure`'s rows."""
    memcpy = statistics.median(rows[0]["gbs"])
    lines = ["| candidate | GB/s median (min-max) | / memcpy |", "|---|---|---|"]
    for r in rows:
        med = statistics.median(r["gbs"])
        lines.append(f"| {r['name']} | {med:.2f} ({min(r['gbs']):.2f}-{max(r['gbs']):.2f}) | "
                     f"{med / memcpy:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = measure(args.mb, args.reps)
    print(f"{args.mb} MB buffer, {args.reps} interleaved repetitions, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
