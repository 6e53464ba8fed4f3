"""Checkpoint and training benchmark: ratios measured side by side in one run.

    python -m bench.run              # full run, GPT-2 124M checkpoints (4-7 min on 2 CPU cores)
    python -m bench.run --quick      # smoke run, small models (~1 min)
    python -m bench.run --device cuda   # the same on GPUs (one per rank; 2 ranks need 2 GPUs)

Prints a table and writes bench/results.json and bench/results.md (override with --out).
Not part of the test suite. Sections (run any subset with --parts):

  save   1. sync save (our Checkpointer.save; bare dcp.save) vs raw write, 1 and 2 ranks
         2. load (our resume path; bare dcp.load) vs raw read, cold page cache if possible
         3. async Checkpointer.save of the same state: seconds blocked vs the sync save
         6. sharded save vs rank-0 gather + torch.save, 2 ranks
  s3     4. the same save to a local moto S3 server vs a plain fsspec put of the same bytes
  train  3. the trainer with --async_checkpoint: seconds blocked vs sync save (from
            metrics.jsonl); tokens/s with a save every 10 steps vs without (step lines)
         5. our loop (FSDP2, 1 rank) vs a plain build-nanogpt-style loop (bench/plain_loop.py)

This module runs the sections; bench/report.py turns their raw numbers into the rows and
tables (and rebuilds them from a results.json with --rerender).

Every ratio is computed per repetition from two measurements taken in the same repetition
(paired), then summarised as min / median / max; a target counts as met on the median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (MODELS, REPO, ChildFailed, describe_model, drop_page_cache,  # noqa: E402
                          log, model_flags, read_json, run_child, segments, servers, torchrun)
from bench import checksums  # noqa: E402
from bench.procwatch import run_watched  # noqa: E402
from bench.report import write_report  # noqa: E402
from dcp_train.job.metrics import read_metrics  # noqa: E402





# --------------------------------------------------------------------------------- settings
def settings(a) -> dict:
    if a.quick:
        s = dict(ckpt_model="micro", world_sizes=[1, 2], reps=2, s3_model="micro",
                 train_model="tiny", train_batch=4, train_total=256, interval=3, segments=2,
                 train_runs=1)
    else:
        s = dict(ckpt_model="gpt2-124m", world_sizes=[1, 2], reps=3, s3_model="tiny",
                 train_model="tiny", train_batch=4, train_total=256, interval=10, segments=3,
                 train_runs=2)
    if a.reps:
        s["reps"] = a.reps
    if a.train_runs:
        s["train_runs"] = a.train_runs
    if a.ckpt_model:
        s["ckpt_model"] = a.ckpt_model
    if a.s3_model:
        s["s3_model"] = a.s3_model
    if a.train_model:
        s["train_model"] = a.train_model
    s["train_seq"] = MODELS[s["train_model"]]["block_size"]
    if a.device == "cuda":  # one GPU per rank
        import torch
        s["world_sizes"] = [w for w in s["world_sizes"] if w <= torch.cuda.device_count()]
    # steps: a warm-up segment (its save is the first one), `segments` measured segments of
    # `interval` steps each ending in a save, and one more step (the last, always saved)
    s["train_steps"] = s["interval"] * (s["segments"] + 1) + 1
    return s


# ------------------------------------------------------------------------------ rows helpers








# ------------------------------------------------------------------------------- save/load
def part_save(a, s, work: Path, results: dict) -> None:
    for ws in s["world_sizes"]:
        out = work / f"ckpt_ws{ws}.json"
        root = work / f"ckpt_ws{ws}"
        args = ["-m", "bench.ckpt_worker", "--model", s["ckpt_model"], "--root", str(root),
                "--out", str(out), "--reps", str(s["reps"]), "--device", a.device]
        if ws >= 2:
            args.append("--gather")
        log(f"[save/load] {s['ckpt_model']} at {ws} rank(s), {s['reps']} reps")
        run_child(torchrun(ws, args), ws, timeout=a.child_timeout, log=log)
        results["raw"][f"ckpt_ws{ws}"] = read_json(out)










# ---------------------------------------------------------------------------------------- S3
def part_s3(a, s, work: Path, results: dict) -> None:
    try:
        server = servers().start_s3_server()
    except Exception as e:  # moto not installed, no free port, ...
        results["raw"]["s3_error"] = f"cannot start moto_server ({type(e).__name__}: {e})"
        return
    try:
        bucket = server.make_bucket("dcp-bench")
        out = work / "s3.json"
        args = ["-m", "bench.ckpt_worker", "--model", s["s3_model"], "--root", f"{bucket}/ws1",
                "--storage_options", json.dumps(server.storage_options), "--out", str(out),
                "--reps", str(s["reps"]), "--device", a.device, "--no_load"]
        log(f"[s3] {s['s3_model']} at 1 rank to moto_server {server.endpoint}, {s['reps']} reps")
        run_child(torchrun(1, args), 1, timeout=a.child_timeout, env=server.env, log=log)
        results["raw"]["s3_ws1"] = read_json(out)
    finally:
        server.close()




# ------------------------------------------------------------------------------------ train






def part_train(a, s, work: Path, results: dict) -> None:
    common = model_flags(s["train_model"]) + [
        "--batch_size", str(s["train_batch"]), "--total_batch_size", str(s["train_total"]),
        "--max_steps", str(s["train_steps"]), "--warmup_steps", "2", "--eval_interval", "0",
        "--hellaswag_interval", "0", "--generate_interval", "0", "--keep_last_n_checkpoints",
        "2", "--device", a.device]
    runs = [("plain", None), ("nosave", 0), ("sync", s["interval"]), ("async", s["interval"])]
    marks, metrics = {name: [] for name, _ in runs}, {name: [] for name, _ in runs}
    # The same OpenMP wait policy for every training run. Left unset, libgomp spins between
    # parallel regions until a process has more OpenMP threads than CPUs; the thread of an
    # async save adds a thread team, which switches spinning off for the rest of that run and
    # changes its speed by up to 2x either way on 2 cores (docs/benchmarks.md, "Things we
    # learned while measuring").
    omp = {} if a.omp_wait_policy == "unset" else {"OMP_WAIT_POLICY": a.omp_wait_policy}
    log(f"[train] {s['train_model']}, 1 rank, {s['train_runs']} x {len(runs)} runs of "
        f"{s['train_steps']} steps of {s['train_total']} tokens, save every {s['interval']} "
        f"(runs: {', '.join(name for name, _ in runs)})")
    for rep in range(s["train_runs"]):
        k = rep % len(runs)
        for name, interval in runs[k:] + runs[:k]:
            d = work / f"train_{name}_{rep}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            if name == "plain":
                cmd = [sys.executable, "-m", "bench.plain_loop", "--model", s["train_model"],
                       "--batch_size", str(s["train_batch"]), "--seq_len", str(s["train_seq"]),
                       "--total_batch_size", str(s["train_total"]),
                       "--steps", str(s["train_steps"]), "--device", a.device,
                       "--out", str(d / "plain.json"),
                       # compiled like the trainer, whose --compile auto is on for CUDA only
                       "--compile", "1" if a.device == "cuda" else "0"]
                marks[name].append(run_watched(cmd, 1, a.child_timeout, skip_root=False,
                                               env=omp, log=log))
            else:
                flags = common + ["--checkpoint_interval", str(interval), "--log_dir",
                                  str(d / "log"), "--checkpoint_dir", str(d / "ckpt")]
                if name == "async":
                    flags.append("--async_checkpoint")
                marks[name].append(run_watched(torchrun(1, ["-m", "dcp_train.main", *flags]), 1,
                                               a.child_timeout, skip_root=True, env=omp,
                                               log=log))
                metrics[name].append(read_metrics(str(d / "log")))
            shutil.rmtree(d, ignore_errors=True)
    results["raw"]["train"] = {"marks": marks, "metrics": metrics, "segments": segments(s),
                               "omp_wait_policy": a.omp_wait_policy}






# ------------------------------------------------------------------------------------ output








def part_checksums(a, s, work: Path, results: dict) -> None:
    log("[checksums] 256 MB buffer, 5 repetitions")
    results["checksums"] = checksums.measure()




# -------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="small models, 2 reps: a ~1 min smoke run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu (gloo) or cuda (nccl); auto = cuda if available")
    p.add_argument("--parts", default="save,s3,train",
                   help="comma list of save, s3, train, checksums (default: save,s3,train)")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 3; --quick 2)")
    p.add_argument("--train_runs", type=int, default=0,
                   help="runs of each training config, interleaved (default 2; --quick 1)")
    p.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                   help="OMP_WAIT_POLICY of the training runs (sections 3, 5); the same for all")
    p.add_argument("--ckpt_model", choices=sorted(MODELS), help="model of sections 1, 2, 6")
    p.add_argument("--s3_model", choices=sorted(MODELS), help="model of section 4")
    p.add_argument("--train_model", choices=sorted(MODELS), help="model of sections 3, 5")
    p.add_argument("--workdir", default="",
                   help="scratch dir for checkpoints (default: a temp dir under bench/, on "
                        "the repo's filesystem; removed at the end)")
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"),
                   help="results JSON; the markdown table goes next to it (.md)")
    p.add_argument("--child_timeout", type=float, default=900)
    p.add_argument("--rerender", metavar="RESULTS_JSON",
                   help="measure nothing: recompute the table of an earlier results.json "
                        "(written to --out)")
    a = p.parse_args(argv)
    if a.rerender:
        write_report(read_json(a.rerender), Path(a.out))
        return
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings(a)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    t0 = time.perf_counter()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix=".scratch-",
                                                                    dir=REPO / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    import torch
    results = {"meta": {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                   f"{platform.platform()})",
        "python": platform.python_version(), "torch": torch.__version__, "device": a.device,
        "quick": a.quick, "reps": s["reps"], "settings": s,
        "models": {"ckpt": describe_model(s["ckpt_model"]), "s3": describe_model(s["s3_model"]),
                   "train": describe_model(s["train_model"])},
        "workdir": str(work), "page_cache_drop_works": drop_page_cache(),
        "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg())},
        "rows": [], "raw": {}, "errors": []}
    dropping = results["meta"]["page_cache_drop_works"]
    log(f"bench: {'quick' if a.quick else 'full'} run, device {a.device}, parts {parts}, "
        f"scratch {work}; page cache drop "
        f"{'works' if dropping else 'does NOT work (warm-cache reads)'}")
    sections = {"save": part_save, "s3": part_s3, "train": part_train,
                "checksums": part_checksums}
    try:
        for name in parts:
            try:
                sections[name](a, s, work, results)
            except ChildFailed as e:
                log(f"[{name}] FAILED: {e}")
                results["errors"].append({"part": name, "error": str(e)[-3000:]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["meta"]["elapsed_s"] = time.perf_counter() - t0
    results["meta"]["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    write_report(results, Path(a.out))
    if results["errors"]:
        raise SystemExit(1)






if __name__ == "__main__":
    main()
