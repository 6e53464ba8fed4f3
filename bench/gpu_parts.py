"""The parts of the GPU check (bench/gpu_check.py runs them: env, speed, exact, pinned, ckpt).

Each part is `part_x(a, s, work, out, budget)`: `a` the command line, `s` the settings (GPU or
TINY in gpu_check.py), `work` its scratch dir, `out` the dict it fills with its figures and
`ok` (True, False, or None where a goal does not apply, e.g. speed on CPU), `budget` the time it
may spend (`budget.left()`: the seconds for the next child; raises TimeoutError once the part's
box or the run's global deadline is spent). Every child is a real torchrun or python process,
killed with its whole process group when its time is up.

  speed  GPT-2 124M, bf16 autocast, --compile on all three runs, world size 1:
         plain    bench/plain_loop.py, build-nanogpt's loop (no FSDP, no checkpoints)
         ours     dcp_train.main (FSDP2, torchrun), no checkpoints
         saves    dcp_train.main with --async_checkpoint every `save_interval` steps
         Throughput over the steps after the first `skip` (compile, warm-up): the plain loop's
         from its per-step times (nothing else runs between its steps); ours from the wall
         clock of the step lines (`elapsed`), so whatever the loop does between steps (the
         per-step agreement, the save request) counts. tokens/s ours / plain (goal >= 0.97),
         MFU of each (goal >= 0.40), saves / ours (goal >= 0.98), and per save the seconds the
         loop was blocked (`blocked_s` of the checkpoint records: the save request plus any
         wait in the next optimizer step for the staging copy; goal < 0.1 s) and `staged_s`.
  ckpt   GPT-2 124M FSDP2 + AdamW state (bench.ckpt_worker): Checkpointer save and resume
         (with verification) against a raw write (one buffered write + fsync of the same
         number of bytes, from the device) and a raw read (one readinto, back to the device),
         same disk, same run, page cache dropped before each where root can; GB/s of each.
  exact  --deterministic --compile --dropout 0.1 --async_checkpoint, world size 1:
         ref and ref2, two uninterrupted runs (the deterministic pair: losses ==), and one
         stopped with --stop_at_step and resumed with --auto_resume (bit-exact resume: losses
         ==, final model, AdamW state and RNG states torch.equal to ref's).
  pinned an async Checkpointer.save stages into pinned host memory on CUDA (bench.gpu_probe).
  env    torch, CUDA device, Python; the torch range check (torch_compat).
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (MODELS, describe_model, log, model_config, model_flags, read_json,
                          run_child, torchrun)
from dcp_train.tools.export import load_full_state
from dcp_train.train.flops import model_flops_per_token, peak_flops
from dcp_train.job.metrics import of_kind, read_metrics
from dcp_train.model import GPT

EXACT_STEPS, EXACT_STOP = 8, 5
GOALS = {"ratio": 0.97, "mfu": 0.40, "save_ratio": 0.98, "blocked_s": 0.1}
STEP_LINE = re.compile(r"step\s+(\d+) \| loss .*\| elapsed\s+([\d.]+)s")


def write_tokens(data_dir: Path, n_train: int, vocab: int, seed: int = 0) -> Path:
    """Synthetic uint16 shards in build-nanogpt's layout (no tokenizer or download needed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(data_dir / "synth_val_000000.npy", rng.integers(0, vocab, 65536, dtype=np.uint16))
    np.save(data_dir / "synth_train_000001.npy", rng.integers(0, vocab, n_train, dtype=np.uint16))
    return data_dir


def trainer(args: list[str]) -> list[str]:
    return torchrun(1, ["-m", "dcp_train.main", *args])


def quiet_flags(a, data: Path, run: Path) -> list[str]:
    """No evaluation, samples or HellaSwag; this run's log and checkpoint dirs."""
    return ["--eval_interval", "0", "--hellaswag_interval", "0", "--generate_interval", "0",
            "--device", a.device, "--data_dir", str(data), "--log_dir", str(run / "log"),
            "--checkpoint_dir", str(run / "ckpt")]


def part_env(a, s, work, out, budget) -> None:
    from dcp_train.torch_compat import UnsupportedTorch, require_dcp_internals
    out["torch"], out["python"] = torch.__version__, platform.python_version()
    out["cuda"] = torch.version.cuda
    out["device_name"] = (torch.cuda.get_device_name(0) if a.device == "cuda"
                          else platform.processor() or "cpu")
    try:
        require_dcp_internals()
        out["torch_supported"] = True
    except UnsupportedTorch as e:
        out["torch_supported"], out["problem"] = False, str(e)
    out["ok"] = out["torch_supported"]


# ------------------------------------------------------------------------------------ speed
def wall_tokens_per_s(stdout: str, skip: int, tokens_per_step: int) -> float:
    """Tokens/s from the wall clock of the step lines, steps skip+1 .. last."""
    elapsed = {int(m[1]): float(m[2]) for m in STEP_LINE.finditer(stdout)}
    last = max(elapsed)
    return tokens_per_step * (last - skip) / (elapsed[last] - elapsed[skip])


def _ours(a, s, work, data, name, extra, budget) -> tuple[float, list]:
    run = work / name
    flags = model_flags(s["speed_model"]) + [
        "--batch_size", str(s["speed_batch"]), "--total_batch_size", str(s["speed_total"]),
        "--max_steps", str(s["speed_steps"]), "--warmup_steps", "2", "--compile", "true",
        *quiet_flags(a, data, run), *extra]
    proc = run_child(trainer(flags), 1, budget.left(), log=log)
    recs = read_metrics(str(run / "log"))
    return wall_tokens_per_s(proc.stdout, s["skip"], s["speed_total"]), recs


def part_speed(a, s, work, out, budget) -> None:
    m, steps, skip = MODELS[s["speed_model"]], s["speed_steps"], s["skip"]
    data = write_tokens(work / "data", s["speed_total"] * (steps + 2),
                        min(m["vocab_size"], 50257))
    plain_out = work / "plain.json"
    run_child([sys.executable, "-m", "bench.plain_loop", "--model", s["speed_model"],
               "--batch_size", str(s["speed_batch"]), "--seq_len", str(m["block_size"]),
               "--total_batch_size", str(s["speed_total"]), "--steps", str(steps),
               "--device", a.device, "--data_dir", str(data), "--compile", "1",
               "--out", str(plain_out)], 1, budget.left(), log=log)
    step_s = [s["speed_total"] / r["tokens_per_s"] for r in read_json(plain_out)["records"]]
    plain = s["speed_total"] * len(step_s[skip:]) / sum(step_s[skip:])
    per_token = model_flops_per_token(GPT(model_config(s["speed_model"])), m["block_size"])
    peak = peak_flops(a.device, a.peak_tflops,
                      torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu")
    out.update(model=describe_model(s["speed_model"]), batch=s["speed_batch"],
               tokens_per_step=s["speed_total"], steps=steps, skip=skip,
               flops_per_token=per_token, peak_flops=peak, plain_tokens_per_s=plain,
               plain_mfu=None if peak is None else per_token * plain / peak)
    ours, _ = _ours(a, s, work, data, "ours", ["--checkpoint_interval", "0"], budget)
    out.update(ours_tokens_per_s=ours, ratio=ours / plain,
               ours_mfu=None if peak is None else per_token * ours / peak)
    saves, recs = _ours(a, s, work, data, "saves", [
        "--checkpoint_interval", str(s["save_interval"]), "--async_checkpoint"], budget)
    ckpts = of_kind(recs, "checkpoint")
    in_loop = [r for r in ckpts if r["step"] < steps]
    out.update(saves_tokens_per_s=saves, save_ratio=saves / ours,
               saves=[{k: r.get(k) for k in ("step", "async", "blocked_s", "staged_s", "seconds",
                                              "bytes")} for r in ckpts],
               max_blocked_s=max((r["blocked_s"] for r in in_loop), default=None))
    if a.device != "cuda":
        out["ok"] = None  # the goals are for GPUs
        return
    out["goals_met"] = {
        "ratio": out["ratio"] >= GOALS["ratio"],
        "mfu": out["ours_mfu"] is not None and out["ours_mfu"] >= GOALS["mfu"],
        "save_ratio": out["save_ratio"] >= GOALS["save_ratio"],
        "blocked_s": bool(in_loop) and all(r["async"] for r in in_loop)
        and out["max_blocked_s"] < GOALS["blocked_s"]}
    out["ok"] = all(out["goals_met"].values())


# ------------------------------------------------------------------------------------- ckpt
def part_ckpt(a, s, work, out, budget) -> None:
    target = work / "ckpt.json"
    run_child(torchrun(1, ["-m", "bench.ckpt_worker", "--model", s["ckpt_model"], "--root",
                           str(work / "ckpt_bench"), "--out", str(target), "--reps",
                           str(s["ckpt_reps"]), "--device", a.device]), 1, budget.left(), log=log)
    r = read_json(target)
    w, rd, size = r["write"], r["read"], r["bytes"]["total"]

    def gbps(times: list) -> float:
        return size / min(times) / 1e9  # the best repetition of each way

    out.update(model=s["ckpt_model"], bytes=size, reps=s["ckpt_reps"],
               cache_dropped=all(r["cache_dropped"]),
               save_gbps=gbps(w["ours"]), raw_write_gbps=gbps(w["raw"]),
               dcp_save_gbps=gbps(w["dcp"]), resume_gbps=gbps(rd["ours"]),
               resume_noverify_gbps=gbps(rd["ours_noverify"]), raw_read_gbps=gbps(rd["raw"]),
               dcp_load_gbps=gbps(rd["dcp"]), seconds={"write": w, "read": rd})
    out["save_vs_raw"] = out["save_gbps"] / out["raw_write_gbps"]
    out["resume_vs_raw"] = out["resume_gbps"] / out["raw_read_gbps"]
    out["ok"] = True  # figures, no goal


# ------------------------------------------------------------------------------------ exact
def part_exact(a, s, work, out, budget) -> None:
    data = write_tokens(work / "data", 400_000, 512)
    common = model_flags(s["exact_model"]) + [
        "--deterministic", "--dropout", "0.1", "--batch_size", str(s["exact_batch"]),
        "--total_batch_size", str(s["exact_total"]), "--max_steps", str(EXACT_STEPS),
        "--warmup_steps", "2", "--checkpoint_interval", "4", "--async_checkpoint",
        "--compile", "true"]
    runs = {"ref": [[]], "resumed": [["--stop_at_step", str(EXACT_STOP)], ["--auto_resume"]],
            "ref2": [[]]}
    for name, segments in runs.items():
        for extra in segments:
            t0 = time.perf_counter()
            run_child(trainer(common + quiet_flags(a, data, work / name) + extra), 1,
                      budget.left(), log=log)
            out.setdefault("seconds", []).append(round(time.perf_counter() - t0, 1))
    recs = {n: read_metrics(str(work / n / "log")) for n in runs}
    losses = {n: {r["step"]: r["loss"] for r in of_kind(recs[n], "train")} for n in runs}
    out["pair_losses_equal"] = losses["ref"] == losses["ref2"] and len(losses["ref"]) == EXACT_STEPS
    out["losses_equal"] = losses["ref"] == losses["resumed"] and len(losses["ref"]) == EXACT_STEPS
    out["resumed_at"] = [r["step"] for r in of_kind(recs["resumed"], "resume")]
    out["async_saves"] = all(r.get("async") for n in runs for r in of_kind(recs[n], "checkpoint"))
    final = f"step_{EXACT_STEPS:08d}"
    ref = load_full_state(work / "ref" / "ckpt" / final, work)
    res = load_full_state(work / "resumed" / "ckpt" / final, work)
    keys = sorted(k for k in ref if k.startswith(("model.", "optim.", "rank_00000.torch_cpu",
                                                  "rank_00000.cuda")))
    out["tensors_compared"] = len(keys)
    out["tensors_differing"] = [k for k in keys if k not in res or not torch.equal(ref[k], res[k])]
    out["cuda_rng_saved"] = "rank_00000.cuda" in ref
    rng = [json.loads(bytes(sd["rank_00000.json"].tolist()))["rng"] for sd in (ref, res)]
    out["rng_plain_equal"] = rng[0] == rng[1]
    out["resume_ok"] = (out["losses_equal"] and not out["tensors_differing"]
                        and out["rng_plain_equal"] and out["resumed_at"] == [EXACT_STOP]
                        and out["async_saves"] and (a.device != "cuda" or out["cuda_rng_saved"]))
    out["ok"] = out["resume_ok"] and out["pair_losses_equal"]


# ----------------------------------------------------------------------------------- pinned
def part_pinned(a, s, work, out, budget) -> None:
    target = work / "probe.json"
    run_child(torchrun(1, ["-m", "bench.gpu_probe", "--root", str(work / "probe"), "--out",
                           str(target), "--device", a.device]), 1, budget.left(), log=log)
    out.update(read_json(target))
    expect_pinned = out["staged_tensors"] if a.device == "cuda" else 0
    out["ok"] = (out["committed"] and out["staged_tensors"] > 0 and out["pinned"] == expect_pinned
                 and out["on_cpu"] == out["staged_tensors"])


PARTS = {"env": part_env, "speed": part_speed, "ckpt": part_ckpt, "exact": part_exact,
         "pinned": part_pinned}
