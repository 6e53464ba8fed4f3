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

Every ratio is computed per repetition from two measurements taken in the same repetition
(paired), then summarised as min / median / max; a target counts as met on the median.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (MODELS, REPO, ChildFailed, describe_model, drop_page_cache,  # noqa: E402
                          model_flags, ratios, read_json, run_child, stats, torchrun)
from bench import checksums  # noqa: E402
from bench.procwatch import run_watched  # noqa: E402
from dcp_train.job.metrics import read_metrics  # noqa: E402

GB = 1e9


def log(msg: str) -> None:
    print(msg, flush=True)


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
def row(section, what, num, den, target_op, target, baseline, ours, bytes_moved, note="",
        invert=False):
    """A table row from paired times. ratio = den/num (time ratio -> speed ratio) unless the
    quantity is already a 'fraction' (invert=True: ratio = num/den)."""
    r = ratios(num, den) if invert else ratios(den, num)
    med = r["median"]
    met = None
    if med is not None and target is not None:
        met = {">=": med >= target, "<=": med <= target, ">": med > target}[target_op]
    return {"section": section, "what": what, "ratio": r, "target": f"{target_op} {target}",
            "met": met, "ours": ours, "baseline": baseline, "bytes_moved": bytes_moved,
            "note": note}


def na_row(section, what, target, why):
    return {"section": section, "what": what, "ratio": stats([]), "target": target, "met": None,
            "ours": "", "baseline": "", "bytes_moved": "", "note": f"not available: {why}"}


def t_and_bw(times, nbytes) -> str:
    med = statistics.median(times)
    return f"{med:.2f} s ({nbytes / med / 1e6:.0f} MB/s)"


def fmt_bytes(n) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


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


def save_rows(s, results: dict) -> list:
    rows = []
    for ws in s["world_sizes"]:
        r = results["raw"].get(f"ckpt_ws{ws}")
        if r is None:
            continue
        n = r["bytes"]["total"]
        n_data = sum(r["bytes"]["per_rank"])
        w, rd = r["write"], r["read"]
        cold = all(r["cache_dropped"])
        tag = f"{ws} rank{'s' if ws > 1 else ''}"
        raw_w = t_and_bw(w["raw"], n_data)
        rows.append(row("1 save", f"Checkpointer.save vs raw write, {tag}", w["ours"], w["raw"],
                        ">=", 0.8, raw_w, t_and_bw(w["ours"], n),
                        f"write {fmt_bytes(n)} (CRC-32C while writing)",
                        note=phase_note(r, "ours_save")))
        rows.append(row("1 save", f"bare dcp.save vs raw write, {tag}", w["dcp"], w["raw"],
                        ">=", 0.8, raw_w, t_and_bw(w["dcp"], n), f"write {fmt_bytes(n)}",
                        note="reference: DCP itself"))
        rows.append(row("1 save", f"Checkpointer.save vs bare dcp.save, {tag}", w["ours"],
                        w["dcp"], ">=", 1.0, t_and_bw(w["dcp"], n), t_and_bw(w["ours"], n),
                        f"write {fmt_bytes(n)}", note=FSYNC))
        rows += cpu_rows(r, tag)
        if w.get("async_blocked"):
            rows.append(row("3 async", f"async Checkpointer.save: seconds blocked / sync "
                            f"Checkpointer.save, {tag}", w["async_blocked"], w["ours"], "<=",
                            0.10, f"sync {statistics.median(w['ours']):.2f} s",
                            f"blocked {statistics.median(w['async_blocked']):.3f} s",
                            f"copy {fmt_bytes(n)} to staging, then as sync", invert=True,
                            note=f"{s['ckpt_model']} in bench.ckpt_worker (no training); "
                                 f"background save until committed "
                                 f"{statistics.median(w['async_total']):.2f} s"))
        if rd:
            cache = "cold page cache" if cold else "WARM page cache (drop_caches failed)"
            raw_r = t_and_bw(rd["raw"], n_data)
            rows.append(row("2 load", f"resume with verification vs raw read, {tag}",
                            rd["ours"], rd["raw"], ">=", 0.8, raw_r, t_and_bw(rd["ours"], n),
                            f"read {fmt_bytes(n)} by dcp.load, checksummed as read",
                            note=f"{cache}; " + phase_note(r, "ours_load")))
            rows.append(row("2 load", f"resume with verification vs bare dcp.load, {tag}",
                            rd["ours"], rd["dcp"], ">=", 1.0, t_and_bw(rd["dcp"], n),
                            t_and_bw(rd["ours"], n), f"read {fmt_bytes(n)}", note=cache))
            if rd.get("ours_noverify"):
                rows.append(row("2 load", f"resume with verify=False vs raw read, {tag}",
                                rd["ours_noverify"], rd["raw"], ">=", 0.8, raw_r,
                                t_and_bw(rd["ours_noverify"], n), f"read {fmt_bytes(n)}",
                                note=f"reference; {cache}"))
            rows.append(row("2 load", f"bare dcp.load vs raw read, {tag}", rd["dcp"], rd["raw"],
                            ">=", 0.8, raw_r, t_and_bw(rd["dcp"], n), f"read {fmt_bytes(n)}",
                            note=f"reference: DCP itself; {cache}"))
        if "gather" in w:
            gb = r.get("gather_bytes") or n
            moved = (f"gather {fmt_bytes(n_data * (ws - 1) / ws)} to rank 0 + write "
                     f"{fmt_bytes(gb)}")
            rows.append(row("6 sharded vs gather",
                            f"speed-up of Checkpointer.save over gather + torch.save, {tag}",
                            w["ours"], w["gather"], ">", 1.0, t_and_bw(w["gather"], gb),
                            t_and_bw(w["ours"], n), moved))
            rows.append(row("6 sharded vs gather",
                            f"speed-up of bare dcp.save over gather + torch.save, {tag}",
                            w["dcp"], w["gather"], ">", 1.0, t_and_bw(w["gather"], gb),
                            t_and_bw(w["dcp"], n), moved, note="reference"))
    return rows


FSYNC = "both sides fsync every file they write (sync_files=True); ours also the manifest, `latest` and the dir"


def cpu_rows(r: dict, tag: str) -> list:
    """CPU-seconds per GB of each way of saving against the raw write's (all processes)."""
    cpu, n = r.get("cpu", {}), r["bytes"]["total"] / GB
    if not cpu.get("raw"):
        return []
    raw = f"raw write {statistics.median(cpu['raw']) / n:.2f} CPU-s/GB"
    return [row("5 cpu", f"CPU-seconds per GB: {what} / raw write, {tag}", cpu[name], cpu["raw"],
                "<=", 1.5, raw, f"{statistics.median(cpu[name]) / n:.2f} CPU-s/GB",
                f"write {fmt_bytes(r['bytes']['total'])}", invert=True, note=note)
            for name, what, note in (
                ("ours", "sync Checkpointer.save", "every rank process, all threads"),
                ("async", "async Checkpointer.save", "rank processes (staging copy) + save "
                                                     "processes"),
                ("dcp", "bare dcp.save", "reference")) if cpu.get(name)]


def phase_note(r: dict, op: str) -> str:
    """'of which commit 0.01 s, ...' (medians of the slowest rank's phase times)."""
    ph = r.get("phases", {}).get(op, {})
    names = {"hash": "second pass over files no rank read", "commit": "commit",
             "check": "discovery"}
    parts = [f"{names[k]} {statistics.median(ph[k]):.2f} s" for k in ("hash", "check", "commit")
             if ph.get(k)]
    return ("of which " + ", ".join(parts)) if parts else ""


# ---------------------------------------------------------------------------------------- S3
def _load_servers():
    """tests/servers.py by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("dcp_bench_servers",
                                                  REPO / "tests" / "servers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def part_s3(a, s, work: Path, results: dict) -> None:
    try:
        servers = _load_servers()
        server = servers.start_s3_server()
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


def s3_rows(s, results: dict) -> list:
    if "s3_error" in results["raw"]:
        return [na_row("4 S3", "S3 Checkpointer.save vs fsspec put", ">= 0.7",
                       results["raw"]["s3_error"])]
    r = results["raw"].get("s3_ws1")
    if r is None:
        return []
    n, w = r["bytes"]["total"], r["write"]
    n_data = sum(r["bytes"]["per_rank"])
    return [
        row("4 S3", "Checkpointer.save to S3 vs fsspec put, 1 rank", w["ours"], w["raw"], ">=",
            0.7, t_and_bw(w["raw"], n_data), t_and_bw(w["ours"], n),
            f"upload {fmt_bytes(n)} in place, manifest PUT commits", note=f"model {s['s3_model']}: moto_server "
            "is a single Python process, ~20 MB/s here"),
        row("4 S3", "bare dcp.save to S3 vs fsspec put, 1 rank", w["dcp"], w["raw"], ">=", 0.7,
            t_and_bw(w["raw"], n_data), t_and_bw(w["dcp"], n), f"upload {fmt_bytes(n)}",
            note="reference: DCP's fsspec writer"),
    ]


# ------------------------------------------------------------------------------------ train
def segments(s) -> list[tuple[int, int]]:
    """Measured segments as (from step line, to step line). Segment j runs from the line of
    step k*j+1 to the line of step k*(j+1)+1: k steps and the save after step k*(j+1). The
    first save (step k) is a warm-up and the final step's save is after the last line."""
    k = s["interval"]
    return [(k * j + 1, k * (j + 1) + 1) for j in range(1, s["segments"] + 1)]


def seg_rates(marks: dict, s) -> tuple[list[float], list[float]]:
    """Per segment: tokens per wall second, tokens per CPU second."""
    wall, cpu = [], []
    for a, b in segments(s):
        tokens = (b - a) * s["train_total"]
        wall.append(tokens / (marks[b][0] - marks[a][0]))
        cpu.append(tokens / max(marks[b][1] - marks[a][1], 1e-9))
    return wall, cpu


def save_times(records: list[dict], s, field: str) -> list:
    """`field` of the checkpoint record of the save inside each measured segment."""
    ckpts: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == "checkpoint":
            ckpts.setdefault(r["step"], {}).update(r)
    return [ckpts.get(b - 1, {}).get(field) for _, b in segments(s)]


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


def _steps(marks: dict) -> dict:
    """JSON turns the int step keys into strings; undo that."""
    return {int(k): v for k, v in marks.items()}


def train_rows(s, results: dict) -> list:
    raw = results["raw"].get("train")
    if raw is None:
        return []
    marks, metrics = raw["marks"], raw["metrics"]
    rows = []
    # per (run, segment): tokens/s on wall clock and on CPU time; runs of one repetition pair up
    rate = {name: [sum(x, []) for x in zip(*(seg_rates(_steps(m), s) for m in ms))]
            for name, ms in marks.items()}
    med = lambda xs: f"{statistics.median(xs):.0f} tok/s"  # noqa: E731
    ck_bytes = next((r.get("bytes") for r in metrics["sync"][0] if r.get("kind") == "checkpoint"
                     and r.get("bytes")), None)
    per_save = f"{fmt_bytes(ck_bytes)} per save" if ck_bytes else ""
    seg_note = (f"OMP_WAIT_POLICY {raw.get('omp_wait_policy', '?')}; "
                f"model {s['train_model']}, {s['train_total']} tokens/step; {s['train_runs']} "
                f"runs x {s['segments']} segments of {s['interval']} steps (+ their save) are "
                f"the repetitions")

    def throughput_rows(section: str, what: str, num: str, den: str, target: float,
                        moved: str, note: str) -> list:
        """Two rows: tokens/s on wall clock (what a user sees; on a shared machine mostly
        other jobs' noise) and on CPU time (the work; paired per segment)."""
        best = max(rate[num][0]) / max(rate[den][0])
        return [
            row(section, what + " (wall clock)", rate[num][0], rate[den][0], ">=", target,
                med(rate[den][0]), med(rate[num][0]), moved, invert=True,
                note=f"{note}best segments {best:.3f}; {seg_note}"),
            row(section, what + " (CPU time)", rate[num][1], rate[den][1], ">=", target,
                med(rate[den][1]).replace("tok/s", "tok/CPU-s"),
                med(rate[num][1]).replace("tok/s", "tok/CPU-s"), moved, invert=True,
                note=f"{note}tokens per CPU-second of the training processes"),
        ]

    sync_s = sum((save_times(m, s, "seconds") for m in metrics["sync"]), [])
    blocked = sum((save_times(m, s, "blocked_s") for m in metrics["async"]), [])
    rows.append(row("3 async", "async save: seconds blocked / sync save seconds", blocked,
                    sync_s, "<=", 0.10, f"sync save {statistics.median(sync_s):.2f} s",
                    f"blocked {statistics.median(blocked):.3f} s", per_save, invert=True,
                    note=seg_note))
    rows += throughput_rows("3 async", f"tokens/s, async save every {s['interval']} steps "
                            "/ no saves", "async", "nosave", 0.97, per_save, "")
    rows += throughput_rows("3 async", f"tokens/s, SYNC save every {s['interval']} steps / "
                            "no saves", "sync", "nosave", 0.97, per_save,
                            f"reference; sync save {statistics.median(sync_s):.2f} s; ")
    rows += throughput_rows("5 loop", "tokens/s, our loop (FSDP2, 1 rank, torchrun) / plain "
                            "loop", "nosave", "plain", 0.95, "none (no save in the measured "
                            "steps)", f"batch {s['train_batch']}x{s['train_seq']}; ")
    return rows


# ------------------------------------------------------------------------------------ output
def fmt_ratio(r) -> str:
    if not r["n"]:
        return "n/a"
    return f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def met_text(m) -> str:
    return {True: "yes", False: "NO", None: "-"}[m]


def profile_lines(results: dict) -> list[str]:
    lines = []
    for key in sorted(results["raw"]):
        if not key.startswith(("ckpt_ws", "s3_")):
            continue
        r = results["raw"][key]
        w, ph = r["write"], r.get("phases", {})
        med = statistics.median
        save = ph.get("ours_save", {})
        if w.get("ours"):
            tot, c = med(w["ours"]), med(save.get("commit", [0]))
            lines.append(f"- {key} ({r['model']}, {fmt_bytes(r['bytes']['total'])}): "
                         f"Checkpointer.save {tot:.2f} s = dcp.save with checksums + collectives "
                         f"{tot - c:.2f} s + commit (manifest, "
                         f"rename, latest, retention) {c:.2f} s; bare dcp.save "
                         f"{med(w['dcp']):.2f} s; raw write {med(w['raw']):.2f} s")
        load = ph.get("ours_load", {})
        if r.get("read", {}).get("ours"):
            tot, chk = med(r["read"]["ours"]), med(load.get("check", [0]))
            lines.append(f"  resume {tot:.2f} s = discovery {chk:.2f} s + Checkpointer.load "
                         f"{tot - chk:.2f} s (of which a second pass over files no rank read "
                         f"{med(load.get('hash', [0])):.2f} s); bare dcp.load "
                         f"{med(r['read']['dcp']):.2f} s; raw "
                         f"read {med(r['read']['raw']):.2f} s")
    return lines


def render_md(results: dict) -> str:
    m = results["meta"]
    out = [f"Measured {m['date']} on {m['machine']}; device {m['device']}; "
           f"{'QUICK smoke run' if m['quick'] else 'full run'}; {m['reps']} repetitions; "
           f"models: save/load {m['models']['ckpt']['name']}, S3 {m['models']['s3']['name']}, "
           f"training {m['models']['train']['name']}; wall time {m['elapsed_s']:.0f} s; "
           f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end.", "",
           "| # | measurement | ratio: median (min-max) | target | met | ours (median) | "
           "baseline (median) | bytes moved | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        out.append(f"| {r['section']} | {r['what']} | {fmt_ratio(r['ratio'])} | {r['target']} | "
                   f"{met_text(r['met'])} | {r['ours']} | {r['baseline']} | {r['bytes_moved']} | "
                   f"{r['note']} |")
    prof = profile_lines(results)
    if prof:
        out += ["", "Phases of Checkpointer.save (median over repetitions):", ""] + prof
    if results.get("checksums"):
        out += ["", "Checksum candidates, GB/s on one core over a 256 MB buffer in memory, "
                "5 interleaved repetitions (`python -m bench.checksums`, part `checksums`):",
                ""] + checksums.table(results["checksums"])
    return "\n".join(out) + "\n"


def part_checksums(a, s, work: Path, results: dict) -> None:
    log("[checksums] 256 MB buffer, 5 repetitions")
    results["checksums"] = checksums.measure()


def render_console(results: dict) -> str:
    lines = []
    for r in results["rows"]:
        lines.append(f"{r['section']:<20} {r['what'][:72]:<72} {fmt_ratio(r['ratio']):<22} "
                     f"target {r['target']:<7} {met_text(r['met']):<4} {r['note'][:60]}")
    lines += [""] + profile_lines(results)
    return "\n".join(lines)


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
        write_results(read_json(a.rerender), Path(a.out))
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
    write_results(results, Path(a.out))
    if results["errors"]:
        raise SystemExit(1)


def all_rows(results: dict) -> list:
    s = results["meta"]["settings"]
    return save_rows(s, results) + s3_rows(s, results) + train_rows(s, results)


def write_results(results: dict, out: Path) -> None:
    results["rows"] = all_rows(results)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    md = out.with_suffix(".md")
    md.write_text(render_md(results))
    log("\n" + render_console(results))
    log(f"\nwrote {out} and {md} (measured in {results['meta']['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
