"""Two storage tiers: --local_checkpoint_dir (node-local) beside the durable --checkpoint_dir.

Real torchrun jobs on CPU/gloo: two torchrun agents (--nnodes 2 --node_rank 0/1, one rank
each, rendezvous on 127.0.0.1) are two "nodes" with local dirs base/<run>/n0 and n1 (the
`{node}` placeholder); the durable tier is the moto S3 server (tests/servers.py). TINY model,
8 steps, dropout 0.1 (the RNG state matters), a local save every step, a durable one every 3.

    ref        one uninterrupted 2-rank run, durable tier only: every comparison's reference
    stopped    2 nodes, --stop_at_step 3 (step 3 on both tiers), then --auto_resume with
               DCP_TRAIN_FAULT=mid_replication:1:6: rank 1 is SIGKILLed after uploading its
               files of step 6, before the durable commit; the bucket's newest stays step 3
    local      -> --auto_resume resumes from the local tier (step >= 6), bit-exact
    lost       the same state with node 1's local dir deleted -> resumes from the bucket,
               and goes on with --async_checkpoint
    outage     the S3 endpoint down while steps are saved: local saves go on, WARNING lines,
               the bucket catches up once it is back; bit-exact
    minutes    --checkpoint_interval_minutes: saves at step boundaries all ranks agree on
    full       the local tier's disk full: one error line, nothing committed changes
    async      --async_checkpoint: rank 1 SIGKILLed while its local save of step 6 is in
               flight -> resumes from local step 5, bit-exact (`lost` finishes async too)

Run: .venv/bin/python -m pytest tests/test_tiers.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (REPO, TINY, assert_same_tensors, child_env, committed, committed_steps,
                     download_step, free_port, kill_job, losses, metrics, of_kind, one_error,
                     read_latest, run_train, s3fs_of, tmpfs, wait_for)

from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.io.names import step_name as step
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.tiers.local import LocalTier
from dcp_train.checkpoint.tiers.replicate import Job, Replicator
from dcp_train.cli import parse_config
from dcp_train.errors import ConfigError
from dcp_train.tools.ckpt import main as ckpt_main

MAX_STEPS = 8
ARGS = [*TINY, "--dropout", "0.1", "--max_steps", str(MAX_STEPS), "--batch_size", "2",
        "--total_batch_size", "384", "--seed", "4321"]
TIERS = ["--local_checkpoint_interval", "1", "--checkpoint_interval", "3"]


def two_nodes(args: list[str], env: dict, out: Path, timeout: float = 120) -> list[int]:
    """Two torchrun agents, one rank each, as nodes 0 and 1; their exit codes. Output goes
    to out.n0 / out.n1."""
    port, procs = free_port(), []
    out.parent.mkdir(parents=True, exist_ok=True)
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "dcp_train.main", *args]
        with open(f"{out}.n{node}", "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_job(p)
    return [p.returncode for p in procs]


def node_args(run: Path, url: str) -> list[str]:
    return [*ARGS, *TIERS, "--log_dir", str(run / "log"), "--checkpoint_dir", url,
            "--local_checkpoint_dir", str(run / "n{node}")]


def resume_record(log: Path) -> dict:
    return metrics(log, "resume")[-1]


@pytest.fixture(scope="module")
def ref(s3, data, base):
    log = base / "ref" / "log"
    run_train(2, [*ARGS, "--checkpoint_interval", "3", "--data_dir", str(data), "--log_dir",
                  str(log), "--checkpoint_dir", "s3://ckpt/ref"], env=s3.env)
    final = download_step(s3fs_of(s3), f"s3://ckpt/ref/{step(MAX_STEPS)}", base / "ref" / "f",
                          base)
    return {"log": log, "final": final}


@pytest.fixture(scope="module")
def killed(s3, data, base) -> Path:
    """Stopped at 3 (both tiers), resumed and killed mid-replication of step 6."""
    run, fs = base / "killed", s3fs_of(s3)
    args = [*node_args(run, "s3://ckpt/killed"), "--data_dir", str(data)]
    assert two_nodes([*args, "--stop_at_step", "3"], s3.env, run / "a") == [0, 0]
    assert read_latest(fs, "ckpt/killed") == step(3)
    codes = two_nodes([*args, "--auto_resume"],
                      {**s3.env, "DCP_TRAIN_FAULT": "mid_replication:1:6"}, run / "b")
    assert codes[1] != 0, (run / "b.n1").read_text()[-3000:]
    assert read_latest(s3fs_of(s3), "ckpt/killed") == step(3)  # step 6 never committed there
    assert sorted(committed(fs, "ckpt/killed")) == [step(3)]
    for node in (0, 1):
        assert max(committed_steps(run / f"n{node}")) >= 6
    return run


def finish_and_compare(s3, ref, run: Path, prefix: str, data: Path, base: Path,
                       extra: tuple = ()) -> dict:
    """--auto_resume to the end; losses == and the durable step 8 torch.equal to ref's."""
    assert two_nodes([*node_args(run, f"s3://ckpt/{prefix}"), "--data_dir", str(data),
                      "--auto_resume", *extra], s3.env, run / "c") == [0, 0]
    assert losses(run / "log") == losses(ref["log"])
    fs = s3fs_of(s3)
    assert read_latest(fs, f"ckpt/{prefix}") == step(MAX_STEPS)
    final = download_step(fs, f"s3://ckpt/{prefix}/{step(MAX_STEPS)}", run / "final", base)
    assert_same_tensors(ref["final"], final)
    return resume_record(run / "log")


def test_killed_before_the_bucket_has_it_resumes_from_local(s3, ref, killed, data, base,
                                                            capsys):
    shutil.copytree(killed, base / "lost")  # for the next test, before this one goes on
    fs = s3fs_of(s3)
    for f in fs.find("ckpt/killed"):
        fs.copy(f, "ckpt/lost" + f[len("ckpt/killed"):])
    newest = min(max(committed_steps(killed / f"n{node}")) for node in (0, 1))
    record = finish_and_compare(s3, ref, killed, "killed", data, base)
    assert record["tier"] == "local" and record["step"] == newest, record
    assert "newer than the durable tier's step 3" in record["tier_reason"]
    out = (killed / "c.n0").read_text()
    assert f"resumed from the local tier: local step {newest} is on every node" in out
    # node 1 holds only its own rank's files (plus what it needs to load alone)
    tier = json.loads((killed / "n1" / step(MAX_STEPS) / "tier.json").read_text())
    own = set(tier["written"]["1"])
    present = {p.name for p in (killed / "n1" / step(MAX_STEPS)).iterdir()}
    assert present == own | {".metadata", "manifest.json", "tier.json"} | set(tier["partial"])
    assert not own & set(tier["written"]["0"])
    # dcp-ckpt ls shows both tiers and what is replicated
    code = ckpt_main(["ls", "s3://ckpt/killed", "--local", str(killed / "n0"), "--local",
                      str(killed / "n1"), "--json", "--storage_options",
                      json.dumps(s3.storage_options)])
    listing = json.loads(capsys.readouterr().out)
    assert code == 0 and len(listing["local"]) == 2
    for local in listing["local"]:
        marks = {c["step"]: c["replicated"] for c in local["checkpoints"]}
        # a step meant for the bucket whose replication a newer one replaced: superseded
        assert marks[MAX_STEPS] == "yes" and set(marks.values()) <= {"yes", "no",
                                                                     "superseded"}, marks


def test_local_dir_lost_resumes_from_the_bucket(s3, ref, data, base):
    run = base / "lost"  # the killed run's state, copied by the test above
    if not run.exists():
        pytest.skip("needs test_killed_before_the_bucket_has_it_resumes_from_local first")
    shutil.rmtree(run / "n1")  # node 1 replaced: its local disk is empty
    # with --async_checkpoint: an async two-tier run resumed from the durable tier, bit-exact
    record = finish_and_compare(s3, ref, run, "lost", data, base, ("--async_checkpoint",))
    assert record["tier"] == "durable" and record["step"] == 3, record
    assert "not usable by rank 1 (node 1)" in record["tier_reason"]


def test_async_local_save_killed_in_flight_resumes_from_local(s3, ref, data, base):
    """--async_checkpoint with two tiers: local saves run in the save processes (the loop is
    blocked only for staging), each replicated once committed locally. Rank 1's save process
    (with rank 1) is SIGKILLed right after writing its shards of step 6: each node's newest
    local commit stays step 5 (the bucket has at most step 3), and the resume, async again,
    comes from the local tier's step 5, bit-exact against the synchronous reference. (An async
    run resumed from the durable tier: test_local_dir_lost_resumes_from_the_bucket.)"""
    run, fs = base / "async", s3fs_of(s3)
    codes = two_nodes([*node_args(run, "s3://ckpt/async"), "--data_dir", str(data),
                       "--async_checkpoint"],
                      {**s3.env, "DCP_TRAIN_FAULT": "after_shards:1:6"}, run / "b")
    assert codes[1] != 0, (run / "b.n1").read_text()[-3000:]
    records = metrics(run / "log", "checkpoint")
    assert [r["step"] for r in records][:4] == [1, 2, 3, 4], records
    for r in records:
        assert r["async"] is True and r["tier"] == "local", r
        assert max(r["blocked_s"], r["staged_s"]) <= r["seconds"] and "per_rank" not in r, r
    for node in (0, 1):
        assert committed_steps(run / f"n{node}")[-1] == 5
        assert (run / f"n{node}" / "latest").read_text() == step(5) + "\n"
    assert [p for p in (run / "n1").iterdir() if ".tmp-" in p.name], "step 6 was not in flight"
    assert set(committed(fs, "ckpt/async")) <= {step(3)}
    record = finish_and_compare(s3, ref, run, "async", data, base, ("--async_checkpoint",))
    assert record["tier"] == "local" and record["step"] == 5, record
    assert not [p for p in (run / "n1").iterdir() if ".tmp-" in p.name]  # retention's


def test_outage_local_saves_go_on_and_replication_catches_up(s3, ref, data, base):
    """One node, 2 ranks; a val loss after every step makes a step ~1 s (no training bit
    changes). The endpoint goes down after step 3 is in the bucket and comes back once a
    replication has failed with a WARNING line; training goes on meanwhile (local saves,
    keeping 1 but never removing step 6, not yet in the bucket), and the bucket catches up:
    it ends at step 8."""
    run, fs = base / "outage", s3fs_of(s3)
    args = [*node_args(run, "s3://ckpt/outage"), "--data_dir", str(data),
            "--eval_interval", "1", "--val_steps", "150", "--keep_last_n_local_checkpoints", "1"]
    out = open(run.parent / "outage.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(free_port()), "-m", "dcp_train.main", *args],
                            cwd=REPO, env=child_env(s3.env), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = lambda: (run.parent / "outage.out").read_text()  # noqa: E731
    try:
        wait_for(lambda: read_latest(fs, "ckpt/outage") == step(3) or proc.poll() is not None,
                 timeout=120)
        s3.stop()  # down until a replication has failed loudly
        t0 = time.monotonic()
        wait_for(lambda: "WARNING: replicat" in seen() or proc.poll() is not None,
                 timeout=180)
        down_for, during = time.monotonic() - t0, committed_steps(run / "n0")
        s3.restart()
        proc.wait(timeout=180)
    finally:
        s3.restart()
        kill_job(proc)
    out.seek(0)
    text = out.read()
    print(f"\noutage {down_for:.1f}s; local steps meanwhile: {during}")
    assert proc.returncode == 0, text[-4000:]
    assert "WARNING: replicat" in text and max(during) >= 6, text[-4000:]
    # local retention keeps 1, but never the only copy of step 6, due for the bucket
    assert 6 in during and not {4, 5} & set(during), during
    fs = s3fs_of(s3)
    assert read_latest(fs, "ckpt/outage") == step(MAX_STEPS)
    assert losses(run / "log") == losses(ref["log"])
    final = download_step(fs, f"s3://ckpt/outage/{step(MAX_STEPS)}", run / "final", base)
    assert_same_tensors(ref["final"], final)


def test_wall_time_intervals_save_at_agreed_step_boundaries(s3, data, base):
    """--checkpoint_interval 0 (only the last step by count): every other save comes from
    rank 0's clock, at a step boundary every rank took (a save is collective: both ranks'
    files are in each committed dir)."""
    run = base / "minutes"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(run / "log"),
                  "--checkpoint_dir", "s3://ckpt/minutes", "--local_checkpoint_dir",
                  str(run / "n{node}"), "--checkpoint_interval", "0",
                  "--checkpoint_interval_minutes", "0.02", "--keep_last_n_local_checkpoints",
                  "-1", "--local_checkpoint_interval_minutes", "0.005", "--eval_interval", "1",
                  "--val_steps", "150"], env=s3.env)
    records = metrics(run / "log")
    local = [r["step"] for r in of_kind(records, "checkpoint")]
    durable = [r["step"] for r in of_kind(records, "replication")]
    assert len(local) >= 3 and local[-1] == MAX_STEPS and len(set(local)) == len(local)
    assert len(durable) >= 2 and durable[-1] == MAX_STEPS, durable
    assert set(durable) <= set(local)
    fs = s3fs_of(s3)
    found = committed(fs, "ckpt/minutes")
    for s in durable:
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(found[step(s)]), found
    assert committed_steps(run / "n0") == sorted(local)


def test_local_disk_full_is_one_line_and_nothing_committed_changes(s3, data, base):
    """A local tier with room for one checkpoint, not two: the second local save is refused
    before anything is written, in the local tier's words; step 1 stays committed."""
    run = base / "full"
    with tmpfs(run / "mnt", "3m") as mnt:
        proc = run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(run / "log"),
                             "--checkpoint_dir", "s3://ckpt/full", "--local_checkpoint_dir",
                             str(mnt / "n{node}"), "--checkpoint_interval", "1",
                             "--keep_last_n_local_checkpoints", "1"], env=s3.env, check=False)
        line = one_error(proc)
        assert line.startswith(f"dcp_train: error: local save of step 2 refused: no space left "
                               f"on the filesystem of {mnt / 'n0'}") and line.endswith(
            "lower --keep_last_n_local_checkpoints, or use another --local_checkpoint_dir"), line
        assert sorted(os.listdir(mnt / "n0")) == ["latest", step(1)]
        assert CheckpointDir(str(mnt / "n0")).check(str(mnt / "n0" / step(1))) is None


def test_a_commit_retried_after_its_commit_point_finishes(s3, base):
    """In this process (a world of one): a durable commit that failed after its manifest PUT
    (here: `latest` deleted, as if the attempt died there) is retried without a listing
    mismatch, and `latest` names the step again."""
    local = LocalTier(str(base / "retry" / "n{node}"), 2, 0, 1)
    local.setup()
    checkpointer = Checkpointer(CheckpointDir("s3://ckpt/retry", s3.storage_options))
    rep = Replicator(checkpointer, 0, say=print, log=lambda kind, **fields: None)
    local.save(1, {"model.w": torch.arange(4096.0)}, replicate=True, durable_step=-1)
    (rec,) = local.checkpointer.records()
    job = Job(1, rec["path"], rec["per_rank"], phase="upload", attempts=1)
    job.target = rep._prepare(job)
    rep._upload(job)
    assert rep._commit(job) == rec["bytes"]
    fs = s3fs_of(s3)
    fs.rm_file("ckpt/retry/latest")
    job.attempts = 2
    assert rep._commit(job) == rec["bytes"] and read_latest(fs, "ckpt/retry") == step(1)
    assert sorted(committed(fs, "ckpt/retry")) == [step(1)]


@pytest.mark.parametrize("flags, words", [
    (["--local_checkpoint_dir", "s3://b/x"], "not a URL"),
    (["--local_checkpoint_dir", "ck", "--checkpoint_dir", "ck"], "is --checkpoint_dir"),
    (["--local_checkpoint_interval", "2"], "needs --local_checkpoint_dir"),
    (["--checkpoint_interval_minutes", "-1"], "must be >= 0"),
    (["--local_checkpoint_dir", "l", "--local_checkpoint_interval", "-1"], "must be >= 0"),
    (["--local_checkpoint_dir", "l", "--keep_last_n_local_checkpoints", "0"], "-1 (keep all)"),
])
def test_bad_tier_flags_are_one_line_errors(flags, words):
    with pytest.raises(ConfigError) as e:
        parse_config(flags)
    assert words in str(e.value) and "\n" not in str(e.value)
