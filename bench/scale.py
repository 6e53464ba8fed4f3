"""What the checkpoint protocol asks of a store at 1 to 1,024 ranks: a simulation, no training.

    python -m bench.scale                       # N = 1, 8, 64, 256, 1024; S3 server + local dir
    python -m bench.scale --ranks 1 8 --write bench/results_scale.md

N simulated ranks (threads of one process, 32 requests in flight at most) write files of a
realistic count (two data files per rank, as DCP writes with dcp_io.WRITE_THREADS = 2; 4 KB
each: the count matters here, not the bytes); rank 0 writes a real DCP `.metadata` and its own
two files with dcp.save. The protocol parts are dcp_train's own code (checkpoint/protocol.py,
layout.py, io/manifest.py, io/storage.py), run on the moto S3 server of tests/servers.py
(127.0.0.1) and on a local dir. Phases, per N:

    commit        a save of step 1: rank 0 picks the dir (leftovers), every rank writes its
                  files, rank 0 writes manifest.json and `latest` and lists for retention
    discovery     rank 0: probe + find_latest(defer=True) as a resume does (listing, `latest`,
                  manifest, step dir listing, `.metadata`, the `meta` entry)
    verification  every rank reads its own files (ranged GETs of the manifest's sizes) and
                  checks their CRC-32 against the manifest, as a load at the same world size
    retention     step 2 saved, then keep 1: rank 0 removes step 1 (manifest first, a listing,
                  batched deletes)

Counted in this process (store/requests.py, what goes on the wire): requests in all and rank
0's own, LIST requests (= listing pages), rank 0's seconds. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from bench.common import run_meta, write_results
from bench.common import servers as load_servers
from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io import manifest as M
from dcp_train.store import requests as R
from dcp_train.checkpoint.io.names import step_name
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.state import json_tensor

FILES_PER_RANK = 2
FILE_BYTES = 4096
IN_FLIGHT = 32
PHASES = ("commit", "discovery", "verification", "retention")


class Phase:
    """Requests and seconds of one phase: rank 0's part and the other ranks' part."""

    def __init__(self):
        self.rank0, self.others, self.rank0_s, self.wall_s = {}, {}, 0.0, 0.0

    def run(self, fn, rank0: bool):
        mark, t0 = R.snapshot(), time.perf_counter()
        out = fn()
        counts = R.since(mark)
        self.wall_s += time.perf_counter() - t0
        if rank0:
            self.rank0 = R.total(self.rank0, counts)
            self.rank0_s += time.perf_counter() - t0
        else:
            self.others = R.total(self.others, counts)
        return out

    def row(self) -> dict:
        every = R.total(self.rank0, self.others)
        return {"all": every, "rank0": R.total(self.rank0), "rank0_s": self.rank0_s,
                "wall_s": self.wall_s, "pages": every.get("LIST", 0)}


def write_rank0(ck: Checkpointer, target: str, step: int) -> dict:
    """Rank 0's files: a real DCP checkpoint (`.metadata`, two data files) with a `meta`."""
    state = {"meta": json_tensor({"step": step, "world_size": 1}),
             "w": torch.arange(FILE_BYTES // 4, dtype=torch.float32)}
    writer = ck.storage.dcp_writer(target)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer, no_dist=True)
    return writer.checksums


def write_rank(ck: Checkpointer, target: str, rank: int) -> dict:
    """Rank `rank`'s two data files (one PUT each, as DCP's writer sends for a small file)."""
    out = {}
    for i in range(FILES_PER_RANK):
        data = os.urandom(FILE_BYTES)
        ck.storage.write_bytes(f"{target}/__{rank}_{i}.distcp", data)
        out[f"__{rank}_{i}.distcp"] = [len(data),
                                        C.hexdigest(C.update(C.CHECKSUM, 0, data))]
    return out


def save(ck: Checkpointer, step: int, n: int, pool, phase: Phase) -> None:
    final = ck.dir.step_path(step)
    target = phase.run(lambda: ck.target_dir(final), rank0=True)
    mine = phase.run(lambda: write_rank0(ck, target, step), rank0=True)
    others = phase.run(lambda: list(pool.map(lambda r: write_rank(ck, target, r),
                                             range(1, n))), rank0=False)
    phase.run(lambda: ck.commit(target, final, step, [mine, *others]), rank0=True)


def verify_own(storage, found, rank: int) -> None:
    mine = {n: v for n, v in found.files.items()
            if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")}
    data = storage.read_many({storage.join(step_name(found.step), n): v["size"]
                              for n, v in mine.items()})
    for path, content in data.items():
        name = path.rsplit("/", 1)[-1]
        checksum, expected = M.digest(mine[name])
        if C.hexdigest(C.update(checksum, 0, content)) != expected:
            raise RuntimeError(f"{path}: {checksum} differs")


def measure(url: str, options: dict | None, n: int) -> dict:
    phases = {p: Phase() for p in PHASES}
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        ck = Checkpointer(CheckpointDir(url, options), keep_last_n=-1)
        save(ck, 1, n, pool, phases["commit"])
        save(ck, 2, n, pool, Phase())  # a second checkpoint, for retention to remove one
        view = CheckpointDir(url, options)
        found = phases["discovery"].run(lambda: (view.probe(), view.find_latest(defer=True))[1],
                                        rank0=True)
        assert found.step == 2 and len(found.files) == FILES_PER_RANK * n + 1, found.files
        ver = phases["verification"]
        ver.run(lambda: verify_own(view.storage, found, 0), rank0=True)
        ver.run(lambda: list(pool.map(lambda r: verify_own(view.storage, found, r),
                                      range(1, n))), rank0=False)
        ck.keep_last_n = 1
        removed = phases["retention"].run(lambda: ck.apply_retention(2, latest=step_name(2)),
                                          rank0=True)
        assert removed == [step_name(1)], removed
    return {p: ph.row() for p, ph in phases.items()}


def render(results: list[dict], ranks: list[int]) -> str:
    s3 = {r["ranks"]: r for r in results if r["store"] == "s3"}
    local = {r["ranks"]: r for r in results if r["store"] == "local"}
    lines = ["## Requests at scale (bench/scale.py)", "",
             f"`python -m bench.scale --ranks {' '.join(map(str, ranks))}`: simulated ranks "
             f"({FILES_PER_RANK} files of {FILE_BYTES} B each, rank 0 a real DCP `.metadata`), "
             "dcp_train's own protocol code; S3 = moto server on 127.0.0.1 (one process, "
             f"{IN_FLIGHT} requests in flight), local = a local dir (no requests: seconds only).",
             "", "| N | phase | S3 requests (all) | by kind | rank 0 requests | LIST pages | "
             "rank-0 s (S3) | all ranks s (S3) | rank-0 s (local) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ranks:
        for p in PHASES:
            a, b = s3[n]["phases"][p], local[n]["phases"][p]
            kinds = ", ".join(f"{k} {v}" for k, v in a["all"].items() if k != "total")
            lines.append(f"| {n} | {p} | {a['all']['total']} | {kinds} | "
                         f"{a['rank0']['total']} | {a['pages']} | {a['rank0_s']:.3f} | "
                         f"{a['wall_s']:.3f} | {b['rank0_s']:.3f} |")
    lines += ["", "Per extra rank (S3, (requests(N) - requests(1)) / (N - 1); its own files: "
              f"{FILES_PER_RANK}):", "", "| N | commit | discovery | verification | retention |",
              "| --- | --- | --- | --- | --- |"]
    for n in ranks[1:]:
        per = [(s3[n]["phases"][p]["all"]["total"] - s3[ranks[0]]["phases"][p]["all"]["total"])
               / (n - ranks[0]) for p in PHASES]
        lines.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in per) + " |")
    top = s3[ranks[-1]]["phases"]["commit"]
    puts = top["all"].get("PUT", 0)
    lines += ["", f"At N = {ranks[-1]} the commit sent {puts} PUTs into one prefix in "
              f"{top['wall_s']:.2f} s: {puts / top['wall_s']:.0f} PUT/s here (one client "
              "process, 32 in flight, moto on a shared 2-core machine), against S3's "
              "documented 3,500 PUT/s per prefix; see docs/requests.md."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    p.add_argument("--write", default="bench/results_scale",
                   help="results files OUT.json and OUT.md (default: %(default)s)")
    a = p.parse_args(argv)
    started, load0 = datetime.datetime.now(), os.getloadavg()
    server = load_servers().start_s3_server()
    results = []
    try:
        server.make_bucket("scale")
        CheckpointDir("s3://scale/warm-up", server.storage_options).storage.listing(
            "s3://scale")  # the client's set-up (connections, credentials) is no phase's
        with tempfile.TemporaryDirectory() as work:
            for n in a.ranks:
                for store, url, options in (("s3", f"s3://scale/n{n}", server.storage_options),
                                            ("local", str(Path(work, f"n{n}")), None)):
                    t0 = time.perf_counter()
                    results.append({"store": store, "ranks": n,
                                    "phases": measure(url, options, n),
                                    "wall_s": time.perf_counter() - t0})
                    print(f"{store} N={n}: {results[-1]['wall_s']:.1f}s", flush=True)
    finally:
        server.close()
    write_results(a.write, run_meta(started, load0, argv), results, render(results, a.ranks))


if __name__ == "__main__":
    main()
