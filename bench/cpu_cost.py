"""CPU-seconds of one save and one load of the same state, one process (no process group,
warm page cache), ours against DCP's own writer/reader: what the checksums cost in CPU,
independent of what else runs on the machine (wall clock is not).

    python -m bench.cpu_cost [--reps 5]

State: a 16M-parameter-like set of fp32 tensors with two AdamW-like copies (0.29 GB, 219
tensors). Ways, interleaved per repetition: bare (dcp.FileSystemWriter/Reader, DCP's
defaults), ours (Storage.dcp_writer/dcp_reader: checksums while writing; reading without and
with verify_with, which checksums every file as DCP reads it). Every file fsynced on save."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

import torch
import torch.distributed.checkpoint as dcp

from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io.storage import Storage


def state() -> dict:
    torch.manual_seed(0)
    sizes = [50304 * 256] + [256 * 768, 256, 256 * 256 * 3, 256 * 1024 * 2, 1024, 256] * 12
    sd = {f"p{i}": torch.randn(n) for i, n in enumerate(sizes)}
    return {**sd, **{k + ".m": v.clone() for k, v in sd.items()},
            **{k + ".v": v.clone() for k, v in sd.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sd = state()
    tpl = {k: torch.empty_like(v) for k, v in sd.items()}
    gb = sum(v.numel() * v.element_size() for v in sd.values()) / 1e9
    root = tempfile.mkdtemp(prefix="dcp_cpu_cost_")
    src = os.path.join(root, "src")
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(src), no_dist=True)

    def verified() -> None:
        reader = Storage(src).dcp_reader(src)
        reader.verify_with(C.CHECKSUM)
        dcp.load(tpl, storage_reader=reader, no_dist=True)
        assert len(reader.digests) == 1

    ways = {"save, bare dcp.save": lambda d: dcp.save(
                sd, storage_writer=dcp.FileSystemWriter(d), no_dist=True),
            "save, ours (checksums while writing)": lambda d: dcp.save(
                sd, storage_writer=Storage(d).dcp_writer(d), no_dist=True),
            "load, bare dcp.load": lambda d: dcp.load(
                tpl, storage_reader=dcp.FileSystemReader(src), no_dist=True),
            "load, ours without verification": lambda d: dcp.load(
                tpl, storage_reader=Storage(src).dcp_reader(src), no_dist=True),
            "load, ours verifying as it reads": lambda d: verified()}
    cpu = {name: [] for name in ways}
    for rep in range(args.reps):
        for name, fn in ways.items():
            d = os.path.join(root, f"w{rep}")
            c0 = sum(os.times()[:2])
            fn(d)
            cpu[name].append(sum(os.times()[:2]) - c0)
            shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{gb:.3f} GB, {len(sd)} tensors, {args.reps} interleaved repetitions, load average "
          f"{os.getloadavg()[0]:.1f} at end\n")
    print("| way | CPU-s median (min-max) | CPU-s per GB |\n|---|---|---|")
    for name, xs in cpu.items():
        med = statistics.median(xs)
        print(f"| {name} | {med:.3f} ({min(xs):.3f}-{max(xs):.3f}) | {med / gb:.2f} |")


if __name__ == "__main__":
    main()
