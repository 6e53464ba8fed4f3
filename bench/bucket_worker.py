"""torchrun worker: a checkpoint saved to and resumed from a bucket, against one parallel
fsspec put / get of the same files.

    torchrun --nproc_per_node N -m bench.bucket_worker --model tiny --url s3://b/run \
        --storage_options JSON --local_dir DIR --reps 3 --out R.json

First an untimed synchronous save into the local dir DIR gives "the same files". Then every
repetition runs, in a rotated order:
  put     each rank uploads its own files of that checkpoint (rank 0 also `.metadata` and
          manifest.json) with one `fs.put(files, urls)` call (fsspec uploads them concurrently,
          large ones as concurrent multipart uploads)
  ours    Checkpointer.save of the same state into --url (the trainer's protocol)
  get     each rank downloads the files it uploaded in `put`, with one `fs.get` call
  resume  the trainer's resume path on what `ours` saved: CheckpointDir.find_latest(defer=True)
          on rank 0, then restore.load with verification (every CRC-32C checked)
A time is wall clock from a barrier before to a barrier after (the slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import time

import fsspec
import torch.distributed as dist

from bench.ckpt_worker import build_state, components
from dcp_train import distributed as D
from dcp_train.checkpoint import restore
from dcp_train.checkpoint.io.lease import WriterLease
from dcp_train.checkpoint.io.names import step_name
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--model", default="tiny")
    p.add_argument("--url", required=True)
    p.add_argument("--storage_options", default="{}")
    p.add_argument("--local_dir", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    info = D.setup("cpu")
    rank, ws = info.rank, info.world_size
    so = json.loads(a.storage_options)
    model, opt, sd = build_state(a.model, info)

    local = CheckpointDir(a.local_dir)
    Checkpointer(local).save(1, sd, rank, ws)
    step_dir = local.step_path(1)
    names = sorted(os.listdir(step_dir))
    mine = [n for n in names if n.startswith(f"__{rank}_")] + (
        [n for n in names if not n.startswith("__")] if rank == 0 else [])
    size = sum(os.path.getsize(os.path.join(step_dir, n)) for n in names)
    fs = fsspec.filesystem(a.url.split("://")[0], **so)
    base = a.url.split("://", 1)[1]
    down = os.path.join(a.local_dir, f"get_{rank}")

    def timed(fn) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    def put(rep):
        fs.put([os.path.join(step_dir, n) for n in mine],
               [posixpath.join(base, f"put_{rep}", n) for n in mine])

    def get(rep):
        shutil.rmtree(down, ignore_errors=True)
        os.makedirs(down)
        fs.get([posixpath.join(base, f"put_{rep}", n) for n in mine],
               [os.path.join(down, n) for n in mine])

    def ours(rep):
        directory = CheckpointDir(f"{a.url}/ours_{rep}", so)
        if rank == 0:
            WriterLease(directory.storage).acquire()
        Checkpointer(directory).save(1, sd, rank, ws)

    def resume(rep):
        directory = CheckpointDir(f"{a.url}/ours_{rep}", so)
        found = D.agree(lambda: directory.find_latest(defer=True))
        assert found is not None and found.path.endswith(step_name(1)), found
        shared, entry = components(model, opt, rank)
        problem = restore.load(found, directory.storage, shared, entry, True, rank, ws)
        assert problem is None, problem

    result = {"model": a.model, "world_size": ws, "url": a.url.split("://")[0], "bytes": size,
              "times": {k: [] for k in ("put", "ours", "get", "resume")}}
    pairs = [("put", put), ("ours", ours)], [("get", get), ("resume", resume)]
    for rep in range(a.reps):
        for ops in pairs:  # saves first (the loads need them), each pair in rotated order
            for name, fn in ops[rep % 2:] + ops[:rep % 2]:
                result["times"][name].append(timed(lambda: fn(rep)))
        if rank == 0:
            print(f"[{result['url']} {a.model} ws={ws}] rep {rep}: " + ", ".join(
                f"{k} {v[-1]:.2f}s" for k, v in result["times"].items()), flush=True)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    D.teardown(clean=True)


if __name__ == "__main__":
    main()
