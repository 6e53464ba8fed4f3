"""The baseline loop: build-nanogpt's train_gpt2.py stripped to one process, no FSDP, no
checkpoints. Same GPT class, same AdamW (dcp_train.optim), same micro-batch, accumulation, LR
schedule and grad clip as our trainer; data read nanoGPT-style (consecutive windows of a shard).

    python -m bench.plain_loop --model small --batch_size 2 --seq_len 256 \
        --total_batch_size 512 --steps 41 --out plain.json

--compile 1 compiles each transformer block in place, exactly as the trainer's --compile does
(dcp_train.compiled), and turns on TF32 on CUDA as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_

from bench.common import model_config
from dcp_train.compiled import compile_blocks, configure_device
from dcp_train.data import find_shards
from dcp_train.data.prepare import ensure_default_data
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer, lr_at


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    for name, default in [("model", "small"), ("data_dir", "data/default"), ("device", "cpu"),
                          ("out", "plain.json")]:
        p.add_argument(f"--{name}", default=default)
    for name, default in [("batch_size", 2), ("seq_len", 256), ("total_batch_size", 512),
                          ("steps", 41), ("warmup_steps", 2), ("compile", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    ensure_default_data(a.data_dir)
    tokens = torch.from_numpy(np.load(find_shards(a.data_dir, "train")[0]).astype(np.int64))
    B, T, accum = a.batch_size, a.seq_len, a.total_batch_size // (a.batch_size * a.seq_len)
    pos = 0

    def next_batch():
        nonlocal pos
        buf = tokens[pos:pos + B * T + 1]
        pos = pos + B * T if pos + 2 * B * T + 1 <= len(tokens) else 0
        return buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)

    torch.manual_seed(1337)
    model = GPT(model_config(a.model)).to(device)
    configure_device(device.type)
    if a.compile:
        compile_blocks(model.transformer.h)
    optimizer = build_optimizer(model, 3e-3, 0.1, device.type)
    records = []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, 3e-3, a.warmup_steps, a.steps)
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = next_batch()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                _, loss = model(x, y)
            loss = loss / accum
            loss_accum += loss.detach()
            loss.backward()
        norm = clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        loss_value, norm = loss_accum.item(), norm.item()
        dt = time.perf_counter() - t0
        records.append({"kind": "train", "step": step, "loss": loss_value,
                        "tokens_per_s": a.total_batch_size / dt})
        print(f"step {step:4d} | loss {loss_value:.4f} | norm {norm:.3f} | tok/s "
              f"{a.total_batch_size / dt:9.0f}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"records": records}, f)


if __name__ == "__main__":
    main()
