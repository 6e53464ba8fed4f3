"""The report of bench/run.py: its rows (what, ratio, target, met) from the raw measurements,
the markdown table (bench/results.md) and the console table; `write_report` writes both
files. Measures nothing: `python -m bench.run --rerender results.json` recomputes a report.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import checksums
from bench.common import log, ratios, save_times, seg_rates, stats
from dcp_train.job.metrics import of_kind

GB = 1e9


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
    ck_bytes = next((r.get("bytes") for r in of_kind(metrics["sync"][0], "checkpoint")
                     if r.get("bytes")), None)
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


def render_console(results: dict) -> str:
    lines = []
    for r in results["rows"]:
        lines.append(f"{r['section']:<20} {r['what'][:72]:<72} {fmt_ratio(r['ratio']):<22} "
                     f"target {r['target']:<7} {met_text(r['met']):<4} {r['note'][:60]}")
    lines += [""] + profile_lines(results)
    return "\n".join(lines)


def all_rows(results: dict) -> list:
    s = results["meta"]["settings"]
    return save_rows(s, results) + s3_rows(s, results) + train_rows(s, results)


def write_report(results: dict, out: Path) -> None:
    """results.json (every raw number and the rows) and results.md beside it; prints the table."""
    results["rows"] = all_rows(results)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    md = out.with_suffix(".md")
    md.write_text(render_md(results))
    log("\n" + render_console(results))
    log(f"\nwrote {out} and {md} (measured in {results['meta']['elapsed_s']:.0f} s)")

