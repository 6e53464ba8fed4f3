"""Bucket throughput: our save and resume on S3 and GCS vs one parallel fsspec put / get of the
same files, measured side by side (bench/bucket_worker.py) against the test servers on
127.0.0.1 (tests/servers.py: moto_server for S3, the GCS emulator for GCS).

    python -m bench.buckets            # tiny on S3 and GCS (1 and 2 ranks), GPT-2 124M on both
    python -m bench.buckets --cells s3:gpt2-124m:1:one_get   # one cell (STORE:MODEL:RANKS[:one_get])
    python -m bench.buckets --quick    # tiny on S3 and GCS, 1 rank, 1 repetition

Goals (issues 14 and 24): save / put >= 0.9 and resume / get >= 0.8, on both. Writes
bench/results_buckets.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (REPO, ChildFailed, fmt_stats, ratios, run_child,  # noqa: E402
                          run_meta, torchrun, write_results)
from bench.common import servers as load_servers  # noqa: E402


# s3fs reads an object larger than its block size (50 MB) as concurrent ranged GETs
# (max_concurrency, default 10). moto_server serves each ranged GET by reading the whole object,
# so there one GET per object is faster; the GPT-2 124M cell is measured both ways.
ONE_GET = {"max_concurrency": 1}


def mb_s(nbytes: int, times: list) -> str:
    return f"{nbytes / sorted(times)[len(times) // 2] / 1e6:.0f} MB/s"


def render(results: list, meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; `python -m bench.buckets "
             f"{meta['args']}`; wall time {meta['wall_s']:.0f} s; load average at start "
             f"{meta['load'][0]}, at end {meta['load'][1]}.", "",
             "| store, model, ranks | checkpoint | save / put (goal >= 0.9) | resume / get (goal "
             ">= 0.8) | save | put | resume (with CRC-32C check) | get |", "|" + "---|" * 8]
    for r in results:
        cell = (f"| {r['url']}, {r['model']}, {r['world_size']}"
                f"{''.join(f', {k}={v}' for k, v in r.get('options', {}).items())} | ")
        if "error" in r:
            lines.append(cell + f"failed: {r['error']} |" + " |" * 6)
            continue
        t, n = r["times"], r["bytes"]
        lines.append(
            cell + f"{n / 1e6:.0f} MB | "
            f"{fmt_stats(ratios(t['put'], t['ours']))} | {fmt_stats(ratios(t['get'], t['resume']))} | "
            f"{mb_s(n, t['ours'])} | {mb_s(n, t['put'])} | {mb_s(n, t['resume'])} | "
            f"{mb_s(n, t['get'])} |")
    lines += ["", "Ratios: median (min-max) of per-repetition time ratios (baseline time / our "
              "time), paired within a repetition. MB/s: checkpoint bytes / median time."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cells", nargs="*", metavar="STORE:MODEL:RANKS",
                   help="measure only these, e.g. s3:gpt2-124m:1")
    p.add_argument("--out", default=str(REPO / "bench" / "results_buckets"))
    a = p.parse_args(argv)
    cells = [("s3", "tiny", 1, a.reps, {}), ("gcs", "tiny", 1, a.reps, {})]
    if a.quick:
        cells = [(s, m, w, 1, o) for s, m, w, _, o in cells]
    else:
        cells += [("s3", "tiny", 2, a.reps, {}), ("gcs", "tiny", 2, a.reps, {}),
                  ("s3", "gpt2-124m", 1, 1, {}), ("s3", "gpt2-124m", 1, 1, ONE_GET),
                  ("gcs", "gpt2-124m", 1, 1, {})]
    if a.cells:
        cells = [(c.split(":")[0], c.split(":")[1], int(c.split(":")[2]), a.reps,
                  ONE_GET if c.endswith(":one_get") else {}) for c in a.cells]
    servers = load_servers()
    t0, load0 = datetime.datetime.now(), os.getloadavg()
    results = []
    started = {"s3": servers.start_s3_server(), "gcs": servers.start_gcs_server()}
    try:
        with tempfile.TemporaryDirectory(prefix="dcp_buckets_") as tmp:
            for i, (store, model, ws, reps, options) in enumerate(cells):
                server = started[store]
                url = f"{server.make_bucket(f'bench{i}')}/run"
                out = Path(tmp) / f"{i}.json"
                args = ["-m", "bench.bucket_worker", "--model", model, "--url", url,
                        "--storage_options", json.dumps({**server.storage_options, **options}),
                        "--local_dir", str(Path(tmp) / f"local{i}"), "--reps", str(reps),
                        "--out", str(out)]
                try:
                    proc = run_child(torchrun(ws, args), ws, timeout=3600, env=server.env)
                except ChildFailed as e:  # reported in its row; the other cells go on
                    error = next((line for line in str(e).splitlines() if "Error" in line),
                                 str(e).splitlines()[0])
                    print(f"[{store} {model} ws={ws}] FAILED: {error}", flush=True)
                    results.append({"url": store, "model": model, "world_size": ws,
                                    "options": options, "error": error[-300:]})
                    continue
                print(proc.stdout.strip(), flush=True)
                results.append({**json.loads(out.read_text()), "options": options})
    finally:
        for server in started.values():
            server.close()
    meta = run_meta(t0, load0, argv)
    write_results(a.out, meta, results, render(results, meta))


if __name__ == "__main__":
    main()
