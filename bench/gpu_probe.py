"""torchrun worker for the GPU check: does an async Checkpointer.save stage into pinned host
memory? Saves a small FSDP2-sharded GPT + AdamW state asynchronously (world size 1 is
enough) and records, for the staged copy the save hands to its background writer, how many
tensors there are, where they live and how many are pinned (torch.Tensor.is_pinned).

    torchrun --nproc_per_node 1 -m bench.gpu_probe --root DIR --out probe.json --device cuda

Expected on CUDA: every staged tensor on the CPU, and pinned if DCP's stager pins its storage:
torch's StateDictStager skips storages under its `pin_memory_min_bytes` (5 bytes in torch
2.13: AdamW's `step` is a 4-byte scalar per parameter), so `eligible` counts the staged
tensors whose storage has at least that many bytes, the threshold read from the stager in
use (0, everything eligible, where a torch release has no such attribute). On CPU none is
pinned (plain memory is what the stager uses there).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.distributed.checkpoint.staging import DefaultStager

from bench.common import model_config
from dcp_train import distributed as D
from dcp_train.checkpoint import state as S
from dcp_train.checkpoint.async_save.save_process import SaveProcess
from dcp_train.checkpoint.io.lease import WriterLease
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer


def _tensors(tree) -> list:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if hasattr(tree, "to_local"):
        tree = tree.to_local()
    if hasattr(tree, "local"):  # a DTensor on its way to the save process (save_process.py)
        tree = tree.local
    return [tree] if isinstance(tree, torch.Tensor) else []


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="tiny")
    a = p.parse_args()
    info = D.setup(a.device)
    torch.manual_seed(0)
    model = D.shard_model(GPT(model_config(a.model)), info)
    opt = build_optimizer(model, 1e-3, 0.1, info.device_type)
    x = torch.randint(0, 500, (2, 17), device=info.device)
    model(x[:, :-1].contiguous(), x[:, 1:].contiguous())[1].backward()
    opt.step()
    seen, min_bytes = [], []
    original = DefaultStager.stage

    def stage(self, state_dict, **kwargs):  # observe the staged copy, change nothing
        staged = original(self, state_dict, **kwargs)
        seen.extend(_tensors(staged.result() if hasattr(staged, "result") else staged))
        inner = getattr(self, "_state_dict_stager", None)
        min_bytes.append(getattr(inner, "pin_memory_min_bytes", 0))
        return staged

    DefaultStager.stage = stage
    directory = CheckpointDir(a.root)
    if info.is_main:  # as the trainer does before saving
        WriterLease(directory.storage).acquire()
    ckpt = Checkpointer(directory, save_process=SaveProcess)
    progress = S.Progress(step=1, tokens=32, world_size=info.world_size, config={"probe": True})
    sd = {}
    for component in [S.ModelState(model), S.OptimizerState(model, opt), progress,
                      S.RankEntry(info.rank, rng=S.RNGState(0, info.rank, progress))]:
        sd.update(component.state_dict())
    ckpt.save(1, sd, info.rank, info.world_size, asynchronous=True)
    ckpt.close()
    records = ckpt.records()
    result = {"device": info.device_type, "staged_tensors": len(seen),
              "on_cpu": sum(t.device.type == "cpu" for t in seen),
              "pinned": sum(t.is_pinned() for t in seen if t.device.type == "cpu"),
              "pin_memory_min_bytes": min_bytes[0] if min_bytes else None,
              "eligible": sum(t.untyped_storage().nbytes() >= (min_bytes or [0])[0]
                              for t in seen if t.device.type == "cpu"),
              "state_tensors_on_device": sum(t.device.type == info.device_type
                                             for t in _tensors(sd)),
              "committed": [r["step"] for r in records] == [1],
              "async_record": bool(records and records[0].get("async"))}
    if info.is_main:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    D.teardown()


if __name__ == "__main__":
    main()
