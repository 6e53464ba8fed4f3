"""Two-tier checkpoints: what a save blocks, and how fast replication uploads.

    python -m bench.tiers [--mb 64] [--reps 3] [--write bench/results_tiers.md]

One process (a world of one), a state dict of `--mb` MB of fp32 tensors, the local tier in a
temp dir on local disk and the durable tier on a moto S3 server on 127.0.0.1
(tests/servers.py). Per repetition, in one run:

- local-only save: tiers/local.LocalTier.save (write, manifest, rename, `latest`, retention);
- two-tier save: the same, plus handing the step to replicate.Replicator: the blocked time
  is what the training loop waits for;
- replication: from that hand-off until the durable commit (`latest` written), driven at
  5 ms "step boundaries"; MB/s of the checkpoint's bytes;
- baseline: one fsspec put of the same files (one call, s3fs uploads them concurrently) to
  another prefix; MB/s.

With --write FILE, the section between the markers below is replaced in FILE (or appended).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import servers as load_servers
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.tiers.local import LocalTier
from dcp_train.checkpoint.tiers.replicate import Replicator

BEGIN, END = "<!-- bench.tiers: begin -->", "<!-- bench.tiers: end -->"


def state_dict(mb: int) -> dict:
    n = mb * (1 << 20) // 4 // 8
    return {f"model.w{i}": torch.randn(n, generator=torch.Generator().manual_seed(i))
            for i in range(8)}


def replicate(rep: Replicator) -> float:
    t0 = time.perf_counter()
    while rep.job is not None:
        rep.advance([rep.report()])
        time.sleep(0.005)
    return time.perf_counter() - t0


def measure(mb: int, reps: int, server, work: Path) -> dict:
    sd = state_dict(mb)
    opts = server.storage_options
    checkpointer = Checkpointer(CheckpointDir("s3://bench/tiers", opts), keep_last_n=1)
    rep = Replicator(checkpointer, 0, say=lambda line: None, log=lambda kind, **f: None)
    only, two = LocalTier(str(work / "only"), 1, 0, 1), LocalTier(str(work / "two"), 1, 0, 1)
    only.setup(), two.setup()
    out = {"local": [], "two_tier": [], "replication": [], "put": [], "bytes": 0}
    for step in range(1, reps + 1):
        t0 = time.perf_counter()
        only.save(step, sd, replicate=False, durable_step=-1)
        out["local"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        two.save(step, sd, replicate=True, durable_step=rep.durable_step)
        (rec,) = two.checkpointer.records()  # what the manager collects after a save
        rep.submit(step, rec["path"], rec["per_rank"])
        out["two_tier"].append(time.perf_counter() - t0)
        out["replication"].append(replicate(rep))
        out["bytes"] = rec["bytes"]
        names = sorted(rec["per_rank"][0])
        t0 = time.perf_counter()
        checkpointer.storage.fs.put([os.path.join(rec["path"], n) for n in names],
                               [f"bench/put/{step}/{n}" for n in names])
        out["put"].append(time.perf_counter() - t0)
    assert checkpointer.dir.latest_name() == f"step_{reps:08d}"
    return out


def render(r: dict, mb: int, reps: int) -> str:
    med = {k: statistics.median(v) for k, v in r.items() if isinstance(v, list)}
    mbs = r["bytes"] / 1e6
    lines = [BEGIN, "## Two tiers (bench/tiers.py)", "",
             f"`python -m bench.tiers --mb {mb} --reps {reps}`: one process, {mbs:.1f} MB "
             "checkpoint, local tier on local disk, durable tier on moto S3 (127.0.0.1); "
             f"medians of {reps}.", "",
             "| what | seconds | ratio |", "| --- | --- | --- |",
             f"| local-only save (blocks the loop) | {med['local']:.3f} | 1.00 |",
             f"| two-tier save, blocked (local save + hand-off) | {med['two_tier']:.3f} | "
             f"{med['two_tier'] / med['local']:.2f} x local-only |",
             f"| replication in the background ({mbs / med['replication']:.0f} MB/s) | "
             f"{med['replication']:.3f} | {med['replication'] / med['put']:.2f} x one put |",
             f"| one parallel fsspec put of the same files ({mbs / med['put']:.0f} MB/s) | "
             f"{med['put']:.3f} | 1.00 |", "",
             "Replication = prepare (leftovers at that step) + the put + a listing to check "
             "sizes + manifest.json + `latest` + retention, phases advanced at step "
             "boundaries (here every 5 ms).", END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=64, help="checkpoint size in MB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", default="", help="markdown file to put the results section in")
    a = p.parse_args(argv)
    server = load_servers().start_s3_server()
    try:
        server.make_bucket("bench")
        with tempfile.TemporaryDirectory() as work:
            text = render(measure(a.mb, a.reps, server, Path(work)), a.mb, a.reps)
    finally:
        server.close()
    print(text)
    if a.write:
        path = Path(a.write)
        old = path.read_text() if path.exists() else ""
        if BEGIN in old and END in old:
            old = old[:old.index(BEGIN)] + old[old.index(END) + len(END) + 1:]
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
