"""The GPU check, one command (launched by launch/gpu_check.sh; < 8 minutes on one H100/H200):

    bash launch/gpu_check.sh                         # CUDA, world size 1 (nccl + gloo)
    bash launch/gpu_check.sh --device cpu --tiny     # the same flow on CPU, tiny models

Parts (each a real torchrun/python child; a failing part is recorded and the rest go on):

  env    torch, CUDA device, Python; the torch range check (torch_compat)
  exact  --compile, --dropout 0.1, --async_checkpoint: an uninterrupted run vs one stopped
         with --stop_at_step and resumed with --auto_resume. Losses ==, final model, AdamW
         state, CPU and CUDA RNG states torch.equal. Deterministic kernels (--deterministic
         if dcp_train.main has it, else bench.deterministic_main).
  pinned an async Checkpointer.save stages into pinned host memory (bench.gpu_probe)
  speed  GPT-2 124M, --compile on both: our trainer (FSDP2, torchrun, 1 rank) vs
         bench/plain_loop.py on the same GPU in this run; tokens/s and MFU (median over the
         steps after the first `skip`), the ratio (goal >= 0.97), and the trainer's sync save
         of the last step (seconds, blocked)
  ckpt   GPT-2 124M Checkpointer: sync save, async save (blocked / until committed) and resume
         with verification, seconds (bench.ckpt_worker, 1 repetition)

Writes --out (default bench/gpu_results.json; --tiny: bench/gpu_results_tiny.json, not kept in
git), a table next to it (.md), and prints the table.
Exit code 1 if a part failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (MODELS, REPO, describe_model, model_config, model_flags,
                          read_json, run_child, torchrun)
from dcp_train.model import GPT
from dcp_train.run.metrics import read_metrics
from dcp_train.train.flops import model_flops_per_token, peak_flops

GPU = dict(exact_model="small", exact_batch=8, exact_total=4096, speed_model="gpt2-124m",
           speed_batch=32, speed_total=262144, speed_steps=25, skip=5, ckpt_model="gpt2-124m",
           timeout=420)
TINY = dict(exact_model="micro", exact_batch=4, exact_total=512, speed_model="tiny",
            speed_batch=4, speed_total=1024, speed_steps=12, skip=4, ckpt_model="micro",
            timeout=300)
EXACT_STEPS, EXACT_STOP = 8, 5


def log(msg: str) -> None:
    print(msg, flush=True)


def write_tokens(data_dir: Path, n_train: int, vocab: int, seed: int = 0) -> Path:
    """Synthetic uint16 shards in build-nanogpt's layout (no tokenizer or download needed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(data_dir / "synth_val_000000.npy", rng.integers(0, vocab, 65536, dtype=np.uint16))
    np.save(data_dir / "synth_train_000001.npy", rng.integers(0, vocab, n_train, dtype=np.uint16))
    return data_dir


def trainer(args: list[str], module: str = "dcp_train.main") -> list[str]:
    return torchrun(1, ["-m", module, *args])


def part_env(a, s, work, out) -> None:
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


def _flat_checkpoint(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = tmp / f"{step_dir.parent.parent.name}.pt"
    dcp_to_torch_save(str(step_dir), str(target))
    sd = torch.load(target, weights_only=True)
    target.unlink()
    return _flatten(sd)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat


def part_exact(a, s, work, out) -> None:
    data = write_tokens(work / "data_exact", 400_000, 512)
    help_text = run_child([sys.executable, "-m", "dcp_train.main", "--help"], 1, 120).stdout
    det = ["--deterministic"] if "--deterministic" in help_text else []
    module = "dcp_train.main" if det else "bench.deterministic_main"
    out["determinism"] = "--deterministic" if det else "bench.deterministic_main"
    common = model_flags(s["exact_model"]) + det + [
        "--dropout", "0.1", "--batch_size", str(s["exact_batch"]), "--total_batch_size",
        str(s["exact_total"]), "--max_steps", str(EXACT_STEPS), "--warmup_steps", "2",
        "--checkpoint_interval", "4", "--eval_interval", "4", "--val_steps", "2",
        "--hellaswag_interval", "0", "--generate_interval", "0", "--async_checkpoint",
        "--compile", "true", "--device", a.device, "--data_dir", str(data)]
    runs = {"ref": [[]], "resumed": [["--stop_at_step", str(EXACT_STOP)], ["--auto_resume"]]}
    for name, segments in runs.items():
        for extra in segments:
            flags = common + ["--log_dir", str(work / name / "log"), "--checkpoint_dir",
                              str(work / name / "ckpt"), *extra]
            t0 = time.perf_counter()
            run_child(trainer(flags, module), 1, s["timeout"], log=log)
            out.setdefault("seconds", []).append(round(time.perf_counter() - t0, 1))
    recs = {n: read_metrics(str(work / n / "log")) for n in runs}
    losses = {n: {r["step"]: r["loss"] for r in recs[n] if r["kind"] == "train"} for n in runs}
    out["steps"] = sorted(losses["resumed"])
    out["losses_equal"] = losses["ref"] == losses["resumed"] and len(losses["ref"]) == EXACT_STEPS
    out["resumed_at"] = [r["step"] for r in recs["resumed"] if r["kind"] == "resume"]
    out["async_saves"] = all(r.get("async") for n in runs for r in recs[n]
                             if r["kind"] == "checkpoint")
    final = f"step_{EXACT_STEPS:08d}"
    ref = _flat_checkpoint(work / "ref" / "ckpt" / final, work)
    res = _flat_checkpoint(work / "resumed" / "ckpt" / final, work)
    keys = sorted(k for k in ref if k.startswith(("model.", "optim.", "rank_00000.torch_cpu",
                                                  "rank_00000.cuda")))
    out["tensors_compared"] = len(keys)
    out["tensors_differing"] = [k for k in keys if k not in res or not torch.equal(ref[k], res[k])]
    out["cuda_rng_saved"] = "rank_00000.cuda" in ref
    rng = [json.loads(bytes(sd["rank_00000.json"].tolist()))["rng"] for sd in (ref, res)]
    out["rng_plain_equal"] = rng[0] == rng[1]
    out["ok"] = (out["losses_equal"] and not out["tensors_differing"] and out["rng_plain_equal"]
                 and out["resumed_at"] == [EXACT_STOP] and out["async_saves"]
                 and (a.device != "cuda" or out["cuda_rng_saved"]))


def part_pinned(a, s, work, out) -> None:
    target = work / "probe.json"
    run_child(torchrun(1, ["-m", "bench.gpu_probe", "--root", str(work / "probe"), "--out",
                           str(target), "--device", a.device]), 1, s["timeout"], log=log)
    out.update(read_json(target))
    expect_pinned = out["staged_tensors"] if a.device == "cuda" else 0
    out["ok"] = (out["committed"] and out["staged_tensors"] > 0 and out["pinned"] == expect_pinned
                 and out["on_cpu"] == out["staged_tensors"])


def _median_after(values: list[float], skip: int) -> float:
    return statistics.median(values[skip:])


def part_speed(a, s, work, out) -> None:
    m = MODELS[s["speed_model"]]
    data = write_tokens(work / "data_speed", s["speed_total"] * (s["speed_steps"] + 2), 50257)
    T, steps = m["block_size"], s["speed_steps"]
    plain_out = work / "plain.json"
    run_child([sys.executable, "-m", "bench.plain_loop", "--model", s["speed_model"],
               "--batch_size", str(s["speed_batch"]), "--seq_len", str(T), "--total_batch_size",
               str(s["speed_total"]), "--steps", str(steps), "--device", a.device,
               "--data_dir", str(data), "--compile", "1", "--out", str(plain_out)],
              1, s["timeout"], log=log)
    plain = [r["tokens_per_s"] for r in read_json(plain_out)["records"]]
    flags = model_flags(s["speed_model"]) + [
        "--batch_size", str(s["speed_batch"]), "--total_batch_size", str(s["speed_total"]),
        "--max_steps", str(steps), "--warmup_steps", "2", "--eval_interval", "0",
        "--hellaswag_interval", "0", "--generate_interval", "0", "--checkpoint_interval", "0",
        "--compile", "true", "--device", a.device, "--data_dir", str(data),
        "--log_dir", str(work / "speed" / "log"), "--checkpoint_dir", str(work / "speed" / "ckpt")]
    run_child(trainer(flags), 1, s["timeout"], log=log)
    recs = read_metrics(str(work / "speed" / "log"))
    ours = [r["tokens_per_s"] for r in recs if r["kind"] == "train"]
    per_token = model_flops_per_token(GPT(model_config(s["speed_model"])), T)
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    peak = peak_flops(a.device, a.peak_tflops, name)
    med_ours, med_plain = _median_after(ours, s["skip"]), _median_after(plain, s["skip"])
    ckpt = [r for r in recs if r["kind"] == "checkpoint"]
    out.update(model=describe_model(s["speed_model"]), batch=s["speed_batch"], seq_len=T,
               tokens_per_step=s["speed_total"], steps=steps, skip=s["skip"],
               flops_per_token=per_token, peak_flops=peak,
               ours_tokens_per_s=med_ours, plain_tokens_per_s=med_plain,
               ratio=med_ours / med_plain, goal=0.97,
               ours_mfu=None if peak is None else per_token * med_ours / peak,
               plain_mfu=None if peak is None else per_token * med_plain / peak,
               ours_logged_mfu=[r["mfu"] for r in recs if r["kind"] == "train"][s["skip"]:],
               trainer_sync_save={k: ckpt[-1].get(k) for k in ("seconds", "blocked_s", "bytes")}
               if ckpt else None)
    out["ok"] = out["ratio"] >= 0.97 if a.device == "cuda" else None  # a goal for GPUs only


def part_ckpt(a, s, work, out) -> None:
    target = work / "ckpt.json"
    run_child(torchrun(1, ["-m", "bench.ckpt_worker", "--model", s["ckpt_model"], "--root",
                           str(work / "ckpt_bench"), "--out", str(target), "--reps", "1",
                           "--device", a.device]), 1, s["timeout"], log=log)
    r = read_json(target)
    w, rd = r["write"], r["read"]
    out.update(model=s["ckpt_model"], bytes=r["bytes"]["total"],
               sync_save_s=w["ours"][0], sync_save_blocked_s=w["ours"][0],
               async_save_blocked_s=w["async_blocked"][0], async_save_total_s=w["async_total"][0],
               resume_s=rd["ours"][0], resume_noverify_s=rd["ours_noverify"][0],
               bare_dcp_save_s=w["dcp"][0], raw_write_s=w["raw"][0])
    out["ok"] = True


PARTS = {"env": part_env, "exact": part_exact, "pinned": part_pinned, "speed": part_speed,
         "ckpt": part_ckpt}


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(res: dict) -> str:
    """The figures as a markdown table (also printed)."""
    e, p = res["parts"].get("env", {}), res["parts"]
    rows = [f"GPU check {res['date']}: {e.get('device_name')} ({res['device']}), torch "
            f"{e.get('torch')}, CUDA {e.get('cuda')}, Python {e.get('python')}; "
            f"{'TINY CPU flow' if res['tiny'] else 'full'}; {res['elapsed_s']:.0f} s", "",
            "| part | figure | value | ok |", "|---|---|---|---|"]

    def add(part, what, value):
        ok = p.get(part, {}).get("ok")
        rows.append(f"| {part} | {what} | {value} | {'-' if ok is None else ok} |")

    add("env", "torch in the supported range, private DCP parts present",
        e.get("torch_supported"))
    x = p.get("exact", {})
    add("exact", f"stop at {EXACT_STOP}, resume, {EXACT_STEPS} steps ({x.get('determinism')}): "
        "losses ==, tensors equal, CUDA RNG saved",
        f"{x.get('losses_equal')}, {len(x.get('tensors_differing', [])) or 0} of "
        f"{x.get('tensors_compared')} differ, {x.get('cuda_rng_saved')}")
    y = p.get("pinned", {})
    add("pinned", "async save: staged tensors pinned / staged",
        f"{y.get('pinned')} / {y.get('staged_tensors')}")
    z = p.get("speed", {})
    add("speed", f"tokens/s, ours / plain loop, --compile ({z.get('model', {}).get('name')}, "
        f"batch {z.get('batch')}x{z.get('seq_len')}, goal >= 0.97)",
        f"{_f(z.get('ours_tokens_per_s'), '.0f')} / {_f(z.get('plain_tokens_per_s'), '.0f')} = "
        f"{_f(z.get('ratio'))}")
    add("speed", "MFU, ours / plain loop (peak "
        f"{_f((z.get('peak_flops') or 0) / 1e12 or None, 'g')} TFLOP/s)",
        f"{_f(z.get('ours_mfu'))} / {_f(z.get('plain_mfu'))}")
    tss = z.get("trainer_sync_save") or {}
    add("speed", "trainer's sync save of the last step: seconds (blocked)",
        f"{_f(tss.get('seconds'), '.2f')} ({_f(tss.get('blocked_s'), '.2f')})")
    c = p.get("ckpt", {})
    add("ckpt", f"{c.get('model')} sync save, blocked = total, s", _f(c.get("sync_save_s"), ".2f"))
    add("ckpt", "async save: blocked / until committed, s",
        f"{_f(c.get('async_save_blocked_s'), '.3f')} / {_f(c.get('async_save_total_s'), '.2f')}")
    add("ckpt", "resume with verification (without), s",
        f"{_f(c.get('resume_s'), '.2f')} ({_f(c.get('resume_noverify_s'), '.2f')})")
    for part, err in res["errors"].items():
        rows.append(f"| {part} | FAILED | {err.splitlines()[0][:200]} | False |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny models: the flow in ~3 min on CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="peak TFLOP/s of the device for MFU (0: by GPU name; none on CPU)")
    ap.add_argument("--out", default="", help="results JSON (default: bench/gpu_results.json; "
                    "with --tiny bench/gpu_results_tiny.json)")
    ap.add_argument("--workdir", default="", help="scratch dir (default: bench/.gpu-scratch)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        log("gpu_check: error: CUDA is not available; run with --device cpu --tiny for the "
            "CPU flow")
        return 2
    s = TINY if a.tiny else GPU
    work = Path(a.workdir or REPO / "bench" / ".gpu-scratch").resolve()
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": a.device, "tiny": a.tiny,
           "settings": s, "parts": {}, "errors": {}}
    t0 = time.perf_counter()
    for name in [x for x in a.parts.split(",") if x]:
        log(f"[{name}] ...")
        out = res["parts"].setdefault(name, {})
        t = time.perf_counter()
        (work / name).mkdir()
        try:
            PARTS[name](a, s, work / name, out)
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
            res["errors"][name] = f"{type(e).__name__}: {e}"[-4000:]
            out["ok"] = False
            log(f"[{name}] FAILED: {res['errors'][name][-2000:]}")
        out["part_seconds"] = round(time.perf_counter() - t, 1)
        log(f"[{name}] {out.get('ok')} in {out['part_seconds']} s")
    res["elapsed_s"] = time.perf_counter() - t0
    target = Path(a.out or REPO / "bench" / f"gpu_results{'_tiny' if a.tiny else ''}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(res, indent=1))
    md = table(res)
    target.with_suffix(".md").write_text(md)
    log("\n" + md + f"\nwrote {target} and {target.with_suffix('.md')}")
    subprocess.run(["rm", "-rf", str(work)])
    failed = res["errors"] or any(p.get("ok") is False for p in res["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
