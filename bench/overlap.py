"""What an asynchronous save costs the training: tokens/s with an async save every K steps vs
without saves, measured side by side (paired runs, rotated order) in one invocation.

    python -m bench.overlap            # models tiny and small, 1 and 2 ranks (~11 min here)
    python -m bench.overlap --quick    # tiny only, 1 rank (~1 min)
    python -m bench.overlap --cells small:1,small:2   # the 16M model only
    python -m bench.overlap --cells small:1 --local --out bench/results_overlap_tiers
                                      # two tiers: every save local first, then replicated

For each (model, world size) it runs the trainer three ways: no saves, `--async_checkpoint`
every K steps, synchronous saves every K steps (reference), `--train_runs` times. A segment is
K steps plus the save after them (bench.common.segments); per segment it reports tokens/s on the
wall clock and per CPU-second of the whole process tree (training and save processes), the
seconds the loop was blocked per save (`blocked_s` of the checkpoint records: the call plus
the optimizer step's wait for the staging copy), and how much the two steps after a save are
slower than the median step of the run without saves.

With --local, every run also has a local tier (--local_checkpoint_dir in the run's temp dir;
the durable --checkpoint_dir is a local dir too): each save is a local save followed by its
replication, synchronous or (--async_checkpoint) in the save process.

Threads: each rank runs OMP_NUM_THREADS = cores / ranks - 1 when that leaves at least one
thread (1 rank on 2 cores: one core trains, one is free, as on a GPU node whose CPUs mostly
idle), else cores / ranks (2 ranks on 2 cores: every core trains and the save processes have to
take theirs from the training). Writes bench/results_overlap.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (REPO, fmt_stats, model_flags, ratios, run_meta,  # noqa: E402
                          save_times, seg_rates, segments, torchrun, write_results)
from bench.procwatch import run_watched  # noqa: E402
from dcp_train.job.metrics import of_kind, read_metrics  # noqa: E402

SHAPES = {  # per model: micro-batch, tokens per step (a step of ~0.1 s and ~1 s here)
    "tiny": dict(batch=4, total=512),
    "small": dict(batch=4, total=2048),
}


def threads(ws: int) -> int:
    per_rank = (os.cpu_count() or 1) // ws
    return per_rank - 1 if per_rank > 1 else max(per_rank, 1)


def measure(model: str, ws: int, a, work: Path, log) -> dict:
    k, shape = a.interval, SHAPES[model]
    s = {"interval": k, "segments": a.segments, "train_total": shape["total"]}
    steps = k * (a.segments + 1) + 1
    common = model_flags(model) + [
        "--batch_size", str(shape["batch"]), "--total_batch_size", str(shape["total"]),
        "--max_steps", str(steps), "--warmup_steps", "2", "--eval_interval", "0",
        "--hellaswag_interval", "0", "--generate_interval", "0",
        "--keep_last_n_checkpoints", "2"]
    runs = {"nosave": ["--checkpoint_interval", "0"],
            "async": ["--checkpoint_interval", str(k), "--async_checkpoint"],
            "sync": ["--checkpoint_interval", str(k)]}
    env = {"OMP_NUM_THREADS": str(threads(ws)), "OMP_WAIT_POLICY": "PASSIVE"}
    marks = {name: [] for name in runs}
    records = {name: [] for name in runs}
    for rep in range(a.train_runs):
        names = list(runs)[rep % 3:] + list(runs)[:rep % 3]
        for name in names:
            d = work / f"{model}_{ws}_{name}_{rep}"
            shutil.rmtree(d, ignore_errors=True)
            flags = common + runs[name] + ["--log_dir", str(d / "log"),
                                           "--checkpoint_dir", str(d / "ckpt")]
            flags += ["--local_checkpoint_dir", str(d / "local")] if a.local else []
            marks[name].append(run_watched(torchrun(ws, ["-m", "dcp_train.main", *flags]), ws,
                                           a.child_timeout, skip_root=True, env=env, log=log))
            records[name].append(read_metrics(str(d / "log")))
            shutil.rmtree(d, ignore_errors=True)
    rate = {n: [sum(x, []) for x in zip(*(seg_rates(m, s) for m in ms))]
            for n, ms in marks.items()}
    blocked = sum((save_times(r, s, "blocked_s") for r in records["async"]), [])
    staged = sum((save_times(r, s, "staged_s") for r in records["async"]), [])
    total = sum((save_times(r, s, "seconds") for r in records["async"]), [])
    sync_s = sum((save_times(r, s, "seconds") for r in records["sync"]), [])
    size = next(r["bytes"] for r in of_kind(records["sync"][0], "checkpoint"))
    return {"model": model, "world_size": ws, "threads_per_rank": threads(ws),
            "bytes_per_save": size, "steps": steps, "segments": segments(s),
            "wall": {n: rate[n][0] for n in runs}, "cpu": {n: rate[n][1] for n in runs},
            "blocked_s": blocked, "staged_s": staged, "async_save_s": total,
            "sync_save_s": sync_s, "after_save": after_save(marks, k, a.segments)}


def after_save(marks: dict, k: int, n_segments: int) -> dict:
    """Wall seconds of the 1st and 2nd step after each measured async save, over the median
    step of the runs without saves (1.0 = not slowed)."""
    def dt(m, n):
        return m[n][0] - m[n - 1][0]
    plain = statistics.median(dt(m, n) for m in marks["nosave"] for n in range(k + 2, len(m) + 1))
    out = {}
    for i in (1, 2):
        out[f"step_{i}"] = [dt(m, k * j + i) / plain for m in marks["async"]
                            for j in range(2, n_segments + 2) if k * j + i in m]
    return out


def med(xs) -> float:
    return statistics.median(x for x in xs if x is not None)


def render(results: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; `python -m bench.overlap "
             f"{meta['args']}`; " + ("two tiers (--local_checkpoint_dir): every save local, "
                                     "then replicated; " if meta.get("local") else "") +
             f"an async save every {meta['interval']} steps; "
             f"{meta['train_runs']} runs x {meta['segments']} segments per cell; wall time "
             f"{meta['wall_s']:.0f} s; load average at start {meta['load'][0]}, at end "
             f"{meta['load'][1]}.", "",
             "| model, ranks (threads/rank) | save | async / no saves, wall | async / no saves, "
             "CPU | sync / no saves, wall | loop blocked per save (median) | staging copy done "
             "after | async save committed after | sync save | 1st / 2nd step after a save, "
             "x a plain step |", "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r['model']}, {r['world_size']} ({r['threads_per_rank']}) | "
            f"{r['bytes_per_save'] / 1e6:.0f} MB | "
            f"{fmt_stats(ratios(r['wall']['async'], r['wall']['nosave']))} | "
            f"{fmt_stats(ratios(r['cpu']['async'], r['cpu']['nosave']))} | "
            f"{fmt_stats(ratios(r['wall']['sync'], r['wall']['nosave']))} | "
            f"{med(r['blocked_s']):.4f} s | {med(r['staged_s']):.3f} s | "
            f"{med(r['async_save_s']):.2f} s | {med(r['sync_save_s']):.2f} s | "
            f"{med(r['after_save']['step_1']):.2f} / {med(r['after_save']['step_2']):.2f} |")
    lines += ["", "Ratios: median (min-max) over paired segments; goal >= 0.98 for async / no "
              "saves. CPU: tokens per CPU-second of all processes of the run, the save processes "
              "included."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 rank, 1 run")
    p.add_argument("--interval", type=int, default=3, help="an async save every N steps")
    p.add_argument("--segments", type=int, default=3, help="measured segments per run")
    p.add_argument("--train_runs", type=int, default=2, help="runs of each kind per cell")
    p.add_argument("--local", action="store_true",
                   help="two tiers: every run also with --local_checkpoint_dir")
    p.add_argument("--child_timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results_overlap"))
    p.add_argument("--cells", default="tiny:1,tiny:2,small:1,small:2",
                   help="model:ranks pairs to measure (--quick: tiny:1)")
    a = p.parse_args(argv)
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cells.split(",")]
    cells = [("tiny", 1)] if a.quick else cells
    if a.quick:
        a.train_runs, a.segments = 1, 2
    t0, load0 = datetime.datetime.now(), os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="dcp_overlap_") as tmp:
        for model, ws in cells:
            print(f"[overlap] {model}, {ws} rank(s)", flush=True)
            results.append(measure(model, ws, a, Path(tmp), lambda m: print(m, flush=True)))
    meta = run_meta(t0, load0, argv, interval=a.interval, segments=a.segments,
                    train_runs=a.train_runs, local=a.local)
    write_results(a.out, meta, results, render(results, meta))


if __name__ == "__main__":
    main()
