"""--checkpoint_dir s3://... and gs://... behave like a local folder (and --data_dir may be a URL).

Real servers on 127.0.0.1 (tests/servers.py: moto_server for s3://, gcp-storage-emulator for
gs://), real 2- and 3-rank torchrun jobs that only get the servers' env vars, real SIGKILL.
TINY model, 8 steps, a checkpoint every 2 steps, dropout 0.1 (so the RNG state matters).

    ref      s3://ckpt/ref      uninterrupted, 2 ranks: the reference of every comparison
    async    s3://ckpt/async    the same with --async_checkpoint
    stop     s3://ckpt/stop     2 ranks --stop_at_step 4, data read from s3://data/synth;
                                then --auto_resume to 8 (2 ranks) and --resume step 4 at 3 ranks
    gcs      gs://ckpt/run      stop at 4 then --auto_resume, --keep_last_n_checkpoints 2
    kill     s3://ckpt/kill     SIGKILL while step 6 is a temp dir being uploaded, then
                                --auto_resume (--keep_last_n_checkpoints 2)
    outage   s3://ckpt/outage   server.stop() while step 6 is being saved (--store_retry_budget 0:
                                no ride-out), restart, --auto_resume
    startup  unreachable endpoint / missing bucket / missing data URL: one error line, no step

Run: .venv/bin/python -m pytest tests/test_buckets.py -q
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from helpers import (LATEST, REPO, TINY, assert_same_tensors, child_env, committed, digests,
                     download_step, error_lines, free_port, kill_job, listing, losses, metrics,
                     read_latest, run_train, s3fs_of, start_train, torchrun_cmd, train_to, wait_for)

from dcp_train.checkpoint.io.names import step_name as step

MAX_STEPS = 8
ARGS = [*TINY, "--dropout", "0.1", "--checkpoint_interval", "2", "--max_steps", str(MAX_STEPS),
        "--batch_size", "2", "--total_batch_size", "384", "--seed", "4321"]  # 12 samples/step


# ------------------------------------------------------------------------------ fixtures
# base, data: conftest.py; s3fs_of, listing, committed, read_latest, download_step: helpers.py


run = functools.partial(train_to, args=ARGS)


def assert_one_error(stderr: str, *expected: str) -> str:
    lines = error_lines(stderr)
    assert lines and len(set(lines)) == 1, stderr[-4000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


class Ref:
    def __init__(self, log: Path, final: dict):
        self.log, self.final = log, final


@pytest.fixture(scope="module")
def ref(s3, data, base) -> Ref:
    """The uninterrupted 2-rank run (checkpoints in s3://ckpt/ref, local data)."""
    log = base / "ref" / "log"
    run(2, ["--data_dir", str(data)], s3.env, log, "s3://ckpt/ref")
    fs = s3fs_of(s3)
    assert read_latest(fs, "ckpt/ref") == step(MAX_STEPS)
    assert sorted(committed(fs, "ckpt/ref")) == [step(s) for s in (2, 4, 6, 8)]
    final = download_step(fs, f"s3://ckpt/ref/{step(MAX_STEPS)}", base / "ref" / "final", base)
    return Ref(log, final)


@pytest.fixture(scope="module")
def stopped(s3, data, base) -> dict:
    """2 ranks, --stop_at_step 4 into s3://ckpt/stop, token shards read from s3://data/synth."""
    fs = s3fs_of(s3)
    for f in sorted(data.iterdir()):
        fs.put_file(str(f), f"data/synth/{f.name}")
    env = {**s3.env, "DCP_TRAIN_CACHE_DIR": str(base / "cache")}
    log = base / "stop" / "log"
    run(2, ["--data_dir", "s3://data/synth", "--stop_at_step", "4"], env, log, "s3://ckpt/stop")
    assert read_latest(fs, "ckpt/stop") == step(4)
    return {"env": env, "log": log}


# -------------------------------------------------------------------- 1. S3, bit-exact resume
def test_s3_stop_and_auto_resume_is_bit_exact(s3, ref, stopped, base, data):
    run(2, ["--data_dir", "s3://data/synth", "--auto_resume"], stopped["env"], stopped["log"],
        "s3://ckpt/stop")
    assert losses(stopped["log"]) == losses(ref.log)  # steps 1-4 and 5-8, bit for bit
    [resume] = metrics(stopped["log"], "resume")
    assert resume["path"] == f"s3://ckpt/stop/{step(4)}" and resume["step"] == 4
    fs = s3fs_of(s3)
    assert read_latest(fs, "ckpt/stop") == step(MAX_STEPS)
    final = download_step(fs, f"s3://ckpt/stop/{step(MAX_STEPS)}", base / "stop" / "final", base)
    assert_same_tensors(ref.final, final)
    # the shards came through the local cache: same files as the local data dir
    [cached] = list((base / "cache" / "data").iterdir())
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in data.iterdir())


def test_s3_save_at_2_resume_at_3(s3, ref, stopped, base, data):
    log = base / "w3" / "log"
    run(3, ["--data_dir", str(data), "--resume", "--checkpoint_path",
            f"s3://ckpt/stop/{step(4)}"], s3.env, log, "s3://ckpt/w3")
    ref_digests = digests(ref.log)
    assert digests(log) == {s: ref_digests[s] for s in range(5, MAX_STEPS + 1)}
    [resume] = metrics(log, "resume")
    assert (resume["world_size_saved"], resume["world_size"]) == (2, 3)
    assert read_latest(s3fs_of(s3), "ckpt/w3") == step(MAX_STEPS)


def test_s3_async_saves_equal_sync_saves(s3, ref, base, data):
    """--async_checkpoint on S3: the save processes get the storage options through their pipe
    (never a file) and commit the same bytes as the synchronous reference run."""
    log = base / "async" / "log"
    run(2, ["--data_dir", str(data), "--async_checkpoint"], s3.env, log, "s3://ckpt/async")
    assert losses(log) == losses(ref.log)
    records = metrics(log, "checkpoint")
    assert [(r["step"], r["async"]) for r in records] == [(s, True) for s in (2, 4, 6, 8)]
    fs = s3fs_of(s3)
    assert sorted(committed(fs, "ckpt/async")) == [step(s) for s in (2, 4, 6, 8)]
    final = download_step(fs, f"s3://ckpt/async/{step(MAX_STEPS)}", base / "async" / "final",
                          base)
    assert_same_tensors(ref.final, final)


# ----------------------------------------------------- 2. GCS: save, resume, retention, speed
def test_gcs_auto_resume_retention_and_save_time(gcs, ref, base, data):
    log, url = base / "gcs" / "log", "gs://ckpt/run"
    keep = ["--data_dir", str(data), "--keep_last_n_checkpoints", "2"]
    run(2, [*keep, "--stop_at_step", "4"], gcs.env, log, url)
    run(2, [*keep, "--auto_resume"], gcs.env, log, url)
    assert losses(log) == losses(ref.log)
    fs = fsspec.filesystem("gcs", **gcs.storage_options)
    fs.invalidate_cache()
    assert listing(fs, "ckpt/run") == [LATEST, step(6), step(8)]  # no temp dirs either
    assert fs.cat_file(f"ckpt/run/{LATEST}").decode() == step(8) + "\n"
    final = download_step(fs, f"{url}/{step(8)}", base / "gcs" / "final", base)
    assert_same_tensors(ref.final, final)
    saves = metrics(log, "checkpoint")
    assert [r["step"] for r in saves] == [2, 4, 6, 8]
    # gcsfs' rename (moveTo) would retry for ~30 s against the emulator: never on our path
    assert max(r["seconds"] for r in saves) < 5, saves


# ------------------------------------------------------- 3. SIGKILL in the middle of an upload
def uploading(fs, path: str, name: str) -> bool:
    """Step dir `name` is being written in place: there, but without its manifest.json."""
    return name in listing(fs, path) and not fs.exists(f"{path}/{name}/manifest.json")


def test_s3_sigkill_mid_upload_resumes_from_previous(s3, ref, base, data):
    """SIGKILLed from outside while step 6 is being written in place: rank 1 stops in the
    middle of one of its files (DCP_TRAIN_FAULT ...:pause), so the dir is there without a
    manifest however loaded the machine is, and the kill comes from the test."""
    log, url, path = base / "kill" / "log", "s3://ckpt/kill", "ckpt/kill"
    args = [*ARGS, "--data_dir", str(data), "--keep_last_n_checkpoints", "2",
            "--log_dir", str(log), "--checkpoint_dir", url]
    fs = s3fs_of(s3)
    proc = start_train(2, args, {**s3.env, "DCP_TRAIN_FAULT": "mid_shard:1:6:pause"})
    try:
        seen = []

        def step6_uploading():
            seen.append(uploading(fs, path, step(6)))
            return seen[-1] or proc.poll() is not None

        wait_for(step6_uploading, timeout=240, interval=0.02)
    finally:
        kill_job(proc)
    assert seen[-1], f"the run ended before saving step 6:\n{proc.stdout.read()[-3000:]}"
    # the kill hit while step 6 was being written, before it was committed
    names = listing(fs, path)
    assert step(6) in names and step(6) not in committed(fs, path), names
    assert read_latest(fs, path) == step(4)

    run_train(2, [*args, "--auto_resume"], env=s3.env)
    [resume] = metrics(log, "resume")
    assert resume["path"] == f"{url}/{step(4)}" and resume["step"] == 4
    assert losses(log) == losses(ref.log)
    # the new save of step 6 replaced the abandoned files; retention kept the 2 newest
    assert listing(fs, path) == [LATEST, step(6), step(8)]
    assert read_latest(fs, path) == step(8)
    final = download_step(fs, f"{url}/{step(8)}", base / "kill" / "final", base)
    assert_same_tensors(ref.final, final)


# ------------------------------------------------------------- 4. endpoint down during a save
def test_s3_outage_during_save_fails_cleanly_then_resumes(s3, ref, base, data):
    log, url, path = base / "outage" / "log", "s3://ckpt/outage", "ckpt/outage"
    fs = s3fs_of(s3)
    out, err = open(base / "outage.out", "w+"), open(base / "outage.err", "w+")
    proc = subprocess.Popen(
        torchrun_cmd(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                         "--checkpoint_dir", url, "--store_retry_budget", "0"]),  # no ride-out
        cwd=REPO, env=child_env(s3.env), stdout=out, stderr=err, text=True,
        start_new_session=True)
    before = {}
    try:
        wait_for(lambda: read_latest(fs, path) == step(4) or proc.poll() is not None, timeout=240)
        before = committed(fs, path)  # all that is committed until step 6's save commits
        wait_for(lambda: uploading(fs, path, step(6)) or proc.poll() is not None,
                 timeout=120, interval=0.02)
        s3.stop()  # endpoint down while step 6 is uploading
        t0 = time.monotonic()
        proc.wait(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        s3.restart()
        kill_job(proc)
    err.seek(0)
    stderr = err.read()
    out.close(), err.close()
    assert proc.returncode != 0 and sorted(before) == [step(2), step(4)], stderr[-3000:]
    line = assert_one_error(stderr, url, "step 6")
    # what the ranks wrote: all before torchrun's own report (its log lines and traceback)
    ours = [x for x in stderr.split("Traceback (most recent call last)")[0].splitlines()
            if "torch/distributed/elastic" not in x]
    assert set(ours) == {line}, stderr[-3000:]
    print(f"\nfailed {seconds:.1f} s after the outage: {line}")

    fs = s3fs_of(s3)
    after = committed(fs, path)
    assert {k: after.get(k) for k in before} == before  # nothing committed was lost
    assert read_latest(fs, path) == max(after)

    run(2, ["--data_dir", str(data), "--auto_resume"], s3.env, log, url)
    assert losses(log) == losses(ref.log)
    final = download_step(fs, f"{url}/{step(MAX_STEPS)}", base / "outage" / "final", base)
    assert_same_tensors(ref.final, final)


# --------------------------------------------------- 5. unreachable endpoint, missing bucket
def test_startup_with_unreachable_endpoint_or_missing_bucket(s3, base, data):
    dead = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    cases = {  # name: env, --checkpoint_dir, --data_dir, what the error line says, exit code
        # an endpoint that refuses connections is an outage (test_outages.py): with no retry
        # budget it ends the run at once, exit 69
        "unreachable": (dead, "s3://ckpt/run", str(data), ["s3://ckpt/run", "connect"], 69),
        "nobucket": (s3.env, "s3://no-such-bucket/run", str(data),
                     ["s3://no-such-bucket", "no such bucket"], 2),
        "nodata": (s3.env, "s3://ckpt/nodata", "s3://no-such-bucket/shards",
                   ["data dir s3://no-such-bucket/shards does not exist"], 2),
    }
    for name, (env, url, data_dir, expected, code) in cases.items():  # world of one
        args = [*ARGS, "--data_dir", data_dir, "--log_dir", str(base / name),
                "--checkpoint_dir", url, "--auto_resume", "--store_retry_budget", "0"]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dcp_train.main", *args], cwd=REPO,
                              env=child_env({**env, "DCP_TRAIN_CACHE_DIR": str(base)}),
                              capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - t0
        assert proc.returncode == code, proc.stderr[-3000:]
        line = assert_one_error(proc.stderr, *expected)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]  # nothing else
        assert "step" not in proc.stdout and not losses(base / name), proc.stdout  # no training
        assert seconds < 20, f"{name}: {seconds:.1f} s"
        print(f"\n{name}: {seconds:.1f} s: {line}")
    assert listing(s3fs_of(s3), "ckpt/nodata") == []  # nothing written before the checks
