"""What --deterministic costs and how it trains: the default mode and the mode, 2 ranks each,
same flags, in one invocation.

    python -m bench.deterministic                  # 200 steps per mode (~10 min on 2 cores)
    python -m bench.deterministic --steps 40       # a quick look

Each mode trains the bench's `tiny` model (3.3M params, GPT-2 vocab) on the embedded default
corpus with --dropout 0.1 for --steps steps at 2 ranks (torchrun, CPU/gloo). The modes run
alternately in --segments pieces of the schedule (a stop with a checkpoint, then
--auto_resume), so load from other processes on the machine falls on both alike. Printed and
written to bench/results_deterministic.md:

- tokens/s: median over the steps after the first 10 of each mode (wall clock, from
  metrics.jsonl), the ratio mode / default, and tokens per CPU-second of the training processes
  (user + sys of the children), which other load disturbs less;
- the loss curve: train loss (mean over the 10 steps up to each checkpoint of the table) and
  val loss every 50 steps, in both modes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import REPO, model_flags, run_child, run_records, torchrun

OUT = REPO / "bench" / "results_deterministic.md"


def children_cpu_seconds() -> float:
    """User + system CPU-seconds of the finished children of this process (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(work: Path, data: Path, mode: str, steps: int, stop: int, a) -> float:
    """Run `mode` up to step `stop` (resuming its own dir); returns the CPU seconds used."""
    flags = model_flags("tiny") + [
        "--data_dir", str(data), "--dropout", "0.1", "--batch_size", str(a.batch_size),
        "--total_batch_size", str(a.total_batch_size), "--max_steps", str(steps),
        "--stop_at_step", str(stop), "--warmup_steps", "20", "--max_lr", "3e-3",
        "--eval_interval", "50", "--val_steps", "8", "--hellaswag_interval", "0",
        "--generate_interval", "0", "--checkpoint_interval", "0", "--auto_resume",
        "--log_dir", str(work / mode / "log"), "--checkpoint_dir", str(work / mode / "ckpt")]
    if mode == "deterministic":
        flags.append("--deterministic")
    t0 = children_cpu_seconds()
    run_child(torchrun(2, ["-m", "dcp_train.main", *flags]), 2, timeout=3600)
    return children_cpu_seconds() - t0


def records(work: Path, mode: str, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in run_records(work / mode, kind)}


def summarize(work: Path, cpu: dict, a) -> str:
    train_r = {m: records(work, m, "train") for m in cpu}
    val_r = {m: records(work, m, "val") for m in cpu}
    tps = {m: statistics.median(r["tokens_per_s"] for s, r in train_r[m].items() if s > 10)
           for m in cpu}
    tokens = a.steps * a.total_batch_size
    per_cpu = {m: tokens / cpu[m] for m in cpu}
    d, base = "deterministic", "default"
    v = a.total_batch_size // 64 // a.batch_size
    lines = [f"Measured {time.strftime('%Y-%m-%dT%H:%M:%S')} on {platform.node()} "
             f"({os.cpu_count()} CPUs), load average {os.getloadavg()[0]:.1f} at the end; "
             f"model tiny (3.3M params), 2 ranks CPU/gloo, {a.total_batch_size} tokens/step "
             f"= V {v} micro-batches of {a.batch_size} x 64 tokens, --dropout 0.1, "
             f"{a.steps} steps per mode in {a.segments} alternating segments.", "",
             "| | default | --deterministic | ratio |", "|---|---|---|---|",
             f"| tokens/s (median, steps > 10) | {tps[base]:.0f} | {tps[d]:.0f} | "
             f"{tps[d] / tps[base]:.3f} |",
             f"| tokens per CPU-second | {per_cpu[base]:.0f} | {per_cpu[d]:.0f} | "
             f"{per_cpu[d] / per_cpu[base]:.3f} |", "",
             "| step | train loss default (mean of 10 steps) | train loss --deterministic | "
             "val loss default | val loss --deterministic |", "|---|---|---|---|---|"]
    for s in range(50, a.steps + 1, 50):
        means = [statistics.fmean(train_r[m][k]["loss"] for k in range(s - 9, s + 1))
                 for m in (base, d)]
        vals = [val_r[m].get(s, {}).get("loss", float("nan")) for m in (base, d)]
        lines.append(f"| {s} | {means[0]:.4f} | {means[1]:.4f} | {vals[0]:.4f} | {vals[1]:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--total_batch_size", type=int, default=2048)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-det-"))
    try:
        data = work / "data"
        from dcp_train.data.prepare import ensure_default_data
        ensure_default_data(str(data))
        cpu = {"default": 0.0, "deterministic": 0.0}
        for k in range(1, a.segments + 1):
            stop = a.steps * k // a.segments
            for mode in (cpu if k % 2 else reversed(list(cpu))):
                cpu[mode] += train(work, data, mode, a.steps, stop, a)
                print(f"  {mode}: up to step {stop}", flush=True)
        text = summarize(work, cpu, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    Path(a.out).write_text("# --deterministic vs default (python -m bench.deterministic)\n\n"
                           + text)


if __name__ == "__main__":
    main()
