"""The GPU check's env, speed and ckpt parts (bench/gpu_check.py runs them; bench/gpu_exact.py
has exact, pinned and deterministic). Each is `part_x(p)`, p a gpu_check.Part: it fills
`p.out` with its figures, runs its children through `p.run` (each a real torchrun or python
process, its output in OUT/logs/<part>.log), and raises CheckFailed when what it checks does
not hold. Goals are figures (`goals_met`, on CUDA only): a missed goal is a finding, not a
failed part. In the rehearsal (CPU, tiny models) every figure is what the CPU gives.

  env    torch, Python, CUDA, the device, its memory, the allocator setting every child runs
         with, the torch range check (torch_compat).
  speed  GPT-2 124M, bf16 autocast, world size 1, compiled on CUDA (each block, as
         --compile does; not in the rehearsal: compiling costs a minute on CPU):
           plain  bench/plain_loop.py, build-nanogpt's loop (no FSDP, no checkpoints)
           ours   dcp_train.main (FSDP2, torchrun), no checkpoints
         Tokens/s over the steps after the first `skip` (compile, warm-up): the plain loop's
         from its per-step perf_counter times (nothing else runs between its steps); ours
         from the `elapsed_s` of its train records (perf_counter since the loop began, full
         precision), so what the loop does between steps counts. ratio ours / plain (goal
         >= 0.97); MFU of each against the bf16 matmul peak measured here (an n x n x n
         product, the mean of 10 after 3 warm-ups) and against the datasheet's (goal >= 0.40).
         Memory (an H100 has 78 GiB, an H200 139): every child runs with
         PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; if plain or ours still runs out of
         memory at micro-batch 64, both run again at 32 (then 16) with the same tokens per
         step (gradient accumulation): `batch` is the one measured, `batch_oom` the ones that
         did not fit.
  ckpt   ours with an async save every `save_interval` steps against ours without (the speed
         part's run; goal >= 0.98). Per save: `blocked_s` (the loop's clock from before the
         state dicts are gathered until save() returns, plus any wait of the next optimizer
         step for the staging copy), `gather_s` (of it, the gathering), `staged_s`,
         `seconds` (until committed). The first save, which also allocates (and on CUDA
         pins) the staging buffers, is reported apart (`first_save`); the goal blocked <
         0.1 s is for the saves after it. Then bench.ckpt_worker: GPT-2 124M + AdamW state,
         Checkpointer save and resume (verified) against a raw write (+ fsync) and a raw
         read of the same bytes, same disk, page cache dropped where root can; GB/s of each
         (a world of one: a plain python process, as dcp_train.distributed.setup allows).
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (MODELS, describe_model, model_config, model_flags, read_json,
                          run_records, torchrun)
from bench.gpu_child import ALLOC_CONF, CheckFailed, ChildOOM
from dcp_train.model import GPT
from dcp_train.train.flops import model_flops_per_token, peak_flops

GOALS = {"ratio": 0.97, "mfu": 0.40, "save_ratio": 0.98, "blocked_s": 0.1}


def write_tokens(data_dir: Path, n_train: int, vocab: int, seed: int = 0) -> Path:
    """Synthetic uint16 shards in build-nanogpt's layout (no tokenizer or download needed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(data_dir / "synth_val_000000.npy", rng.integers(0, vocab, 65536, dtype=np.uint16))
    np.save(data_dir / "synth_train_000001.npy", rng.integers(0, vocab, n_train, dtype=np.uint16))
    return data_dir


def trainer(args: list[str]) -> list[str]:
    return torchrun(1, ["-m", "dcp_train.main", *args])


def quiet_flags(device: str, data: Path, run: Path) -> list[str]:
    """No evaluation, samples or HellaSwag; this run's log and checkpoint dirs."""
    return ["--eval_interval", "0", "--hellaswag_interval", "0", "--generate_interval", "0",
            "--device", device, "--data_dir", str(data), "--log_dir", str(run / "log"),
            "--checkpoint_dir", str(run / "ckpt")]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"


def part_env(p) -> None:
    from dcp_train.torch_compat import UnsupportedTorch, require_dcp_internals
    p.out.update(torch=torch.__version__, python=platform.python_version(),
                 cuda=torch.version.cuda, device=p.a.device, device_name=device_name(p.a.device),
                 rehearsal=p.a.rehearse, alloc_conf=ALLOC_CONF, deadline_s=p.a.deadline)
    if p.a.device == "cuda":
        p.out["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        require_dcp_internals()
    except UnsupportedTorch as e:
        raise CheckFailed(f"torch outside the supported range: {e}") from None


# ------------------------------------------------------------------------------------ speed
def matmul_flops(device: str, n: int, reps: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matrix product here: the mean of `reps` after 3 warm-ups."""
    x, y = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        x @ y
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    sync()
    flops = 2 * n ** 3 * reps / (time.perf_counter() - t)
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return flops


def loop_tokens_per_s(elapsed: dict[int, float], skip: int, tokens_per_step: int) -> float:
    """Tokens/s of steps skip+1 .. last from each step's end on one clock (step -> seconds)."""
    last = max(elapsed)
    return tokens_per_step * (last - skip) / (elapsed[last] - elapsed[skip])


def ours(p, data: Path, batch: int, name: str, extra: list[str]) -> tuple[float, list[dict]]:
    """Our trainer's tokens/s (train records' elapsed_s) and its records."""
    s, run = p.s, p.work / name
    p.run(trainer(model_flags(s["speed_model"]) + [
        "--batch_size", str(batch), "--total_batch_size", str(s["speed_total"]),
        "--max_steps", str(s["speed_steps"]), "--warmup_steps", "2",
        "--compile", str(s["compile"]).lower(), *quiet_flags(p.a.device, data, run), *extra]))
    recs = run_records(run)
    elapsed = {r["step"]: r["elapsed_s"] for r in recs if r["kind"] == "train"}
    return loop_tokens_per_s(elapsed, s["skip"], s["speed_total"]), recs


def plain(p, data: Path, batch: int) -> float:
    s, target = p.s, p.work / f"plain_{batch}.json"
    p.run([sys.executable, "-m", "bench.plain_loop", "--model", s["speed_model"],
           "--batch_size", str(batch), "--seq_len", str(MODELS[s["speed_model"]]["block_size"]),
           "--total_batch_size", str(s["speed_total"]), "--steps", str(s["speed_steps"]),
           "--device", p.a.device, "--data_dir", str(data), "--compile", str(int(s["compile"])),
           "--out", str(target)])
    step_s = [s["speed_total"] / r["tokens_per_s"] for r in read_json(target)["records"]]
    return s["speed_total"] * len(step_s[s["skip"]:]) / sum(step_s[s["skip"]:])


def with_batch_fallback(batches: list[int], measure, oom: list[int]):
    """measure(batch) at the first batch that fits: a ChildOOM moves on to the next (appended
    to `oom`); CheckFailed if none fits."""
    for batch in batches:
        try:
            return batch, measure(batch)
        except ChildOOM:
            oom.append(batch)
    raise CheckFailed(f"out of memory at every micro-batch tried ({batches})")


def part_speed(p) -> None:
    a, s, out = p.a, p.s, p.out
    m = MODELS[s["speed_model"]]
    data = p.shared["data"] = write_tokens(p.work / "data", s["speed_total"] *
                                           (s["speed_steps"] + 2), min(m["vocab_size"], 50257))
    per_token = model_flops_per_token(GPT(model_config(s["speed_model"])), m["block_size"])
    measured = matmul_flops(a.device, s["matmul_n"])
    datasheet = peak_flops(a.device, a.peak_tflops, device_name(a.device))
    out.update(model=describe_model(s["speed_model"]), compiled=s["compile"], bf16=True,
               tokens_per_step=s["speed_total"], steps=s["speed_steps"], skip=s["skip"],
               flops_per_token=per_token, matmul_n=s["matmul_n"],
               peak_measured_flops=measured, peak_datasheet_flops=datasheet,
               alloc_conf=ALLOC_CONF, batch_oom=[])

    def measure(batch: int) -> None:  # each figure kept as soon as it is measured
        out["batch"] = batch
        out["plain_tokens_per_s"] = plain(p, data, batch)
        out["ours_tokens_per_s"] = ours(p, data, batch, "ours", ["--checkpoint_interval", "0"])[0]

    with_batch_fallback(s["speed_batches"], measure, out["batch_oom"])
    plain_tps, ours_tps = out["plain_tokens_per_s"], out["ours_tokens_per_s"]
    p.shared.update(batch=out["batch"], ours_tokens_per_s=ours_tps)

    def mfu(tps, peak):
        return None if peak is None else per_token * tps / peak

    out.update(ratio=ours_tps / plain_tps, mfu={
        "ours_measured": mfu(ours_tps, measured), "plain_measured": mfu(plain_tps, measured),
        "ours_datasheet": mfu(ours_tps, datasheet), "plain_datasheet": mfu(plain_tps, datasheet)})
    if a.device == "cuda":
        out["goals_met"] = {"ratio": out["ratio"] >= GOALS["ratio"], "mfu": datasheet is not None
                            and out["mfu"]["ours_datasheet"] >= GOALS["mfu"]}


# ------------------------------------------------------------------------------------- ckpt
def save_figures(recs: list[dict], steps: int) -> dict:
    """Per-save figures of a run's checkpoint records; the first in-loop save apart."""
    keys = ("step", "async", "blocked_s", "gather_s", "staged_s", "seconds", "bytes")
    saves = [{k: r.get(k) for k in keys} for r in recs if r["kind"] == "checkpoint"]
    in_loop = [r for r in saves if r["step"] < steps]
    if not in_loop or not all(r["async"] for r in in_loop):
        raise CheckFailed(f"expected async saves inside the loop, got {saves}")
    short = [r["step"] for r in saves if not r["blocked_s"] >= r["gather_s"] > 0]
    if short:
        raise CheckFailed(f"blocked_s does not include gathering the state dicts at {short}")
    return {"first_save": in_loop[0], "saves": saves,
            "steady_max_blocked_s": max((r["blocked_s"] for r in in_loop[1:]), default=None)}


def part_ckpt(p) -> None:
    a, s, out = p.a, p.s, p.out
    data = p.shared.get("data") or write_tokens(
        p.work / "data", s["speed_total"] * (s["speed_steps"] + 2),
        min(MODELS[s["speed_model"]]["vocab_size"], 50257))
    batch = p.shared.get("batch", s["speed_batches"][-1])
    none = p.shared.get("ours_tokens_per_s")
    out.update(batch=batch, save_every=s["save_interval"], none_from="speed" if none else "ckpt")
    if none is None:
        none, _ = ours(p, data, batch, "none", ["--checkpoint_interval", "0"])
    saves, recs = ours(p, data, batch, "saves", [
        "--checkpoint_interval", str(s["save_interval"]), "--async_checkpoint"])
    out.update(saves_tokens_per_s=saves, none_tokens_per_s=none, save_ratio=saves / none,
               **save_figures(recs, s["speed_steps"]))
    target = p.work / "ckpt.json"
    p.run([sys.executable, "-m", "bench.ckpt_worker", "--model", s["ckpt_model"], "--root",
           str(p.work / "ckpt_bench"), "--out", str(target), "--reps", "1", "--device", a.device])
    r = read_json(target)
    w, rd, size = r["write"], r["read"], r["bytes"]["total"]

    def gbps(times: list) -> float:
        return size / min(times) / 1e9

    out.update(model=s["ckpt_model"], bytes=size, cache_dropped=all(r["cache_dropped"]),
               save_gbps=gbps(w["ours"]), raw_write_gbps=gbps(w["raw"]),
               dcp_save_gbps=gbps(w["dcp"]), resume_gbps=gbps(rd["ours"]),
               resume_noverify_gbps=gbps(rd["ours_noverify"]), raw_read_gbps=gbps(rd["raw"]),
               dcp_load_gbps=gbps(rd["dcp"]))
    out["save_vs_raw"] = out["save_gbps"] / out["raw_write_gbps"]
    out["resume_vs_raw"] = out["resume_gbps"] / out["raw_read_gbps"]
    if a.device == "cuda":
        steady = out["steady_max_blocked_s"]
        out["goals_met"] = {"save_ratio": out["save_ratio"] >= GOALS["save_ratio"],
                            "blocked_s": steady is not None and steady < GOALS["blocked_s"]}


PARTS = {"env": part_env, "speed": part_speed, "ckpt": part_ckpt}
