"""The fault matrix, walked as a schedule: real 2-rank torchrun jobs against the moto S3 server
behind tests/fault_proxy.py, which answers each documented transient answer (S3's XML error
body with its status), resets, cuts an answer short or stays silent, each armed on the
request of one protocol phase. The classifier itself is tested over every answer, for S3 and
GCS, in tests/test_store_errors.py; here the whole path (at the source, through DCP's gathers,
ride_out) runs for real.

    schedule  leg 1 (to step 6, --stop_at_step 6) and leg 2 (--auto_resume to step 8), the
              faults below, each for a few seconds: exit 0 both times, losses and the final
              state bit-identical to an undisturbed run, every fault came and went
    permanent 403 AccessDenied, 404 NoSuchBucket, 400 InvalidArgument at step 2's first
              write: one line naming the store, exit 2, no retry

Run: .venv/bin/python -m pytest tests/test_fault_matrix.py -q -s
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from helpers import (TINY, assert_same_tensors, download_step, losses, read_latest,
                     run_train, s3fs_of, write_shards)

from dcp_train.checkpoint.layout import step_name as step

MAX_STEPS = 8
ARGS = [*TINY, "--dropout", "0.1", "--checkpoint_interval", "2", "--max_steps", str(MAX_STEPS),
        "--batch_size", "2", "--total_batch_size", "384", "--seed", "2468",
        "--keep_last_n_checkpoints", "2", "--store_retry_budget", "60", "--stall_timeout", "30"]
FAULT_S = 3  # each fault lasts this long once it starts


def schedule(run: str) -> tuple[list, list]:
    """(leg 1's faults, leg 2's): (mode, answer, regex of the request that starts it, after,
    nth), covering save write, commit, the moment after a commit, lease, retention, resume
    discovery and resume load, with every transient kind."""
    p = f"/ckpt/{run}"
    leg1 = [
        ("answer", "InternalError", rf"PUT {p}/step_00000002/__0_0", False, 1),  # write
        ("answer", "RequestTimeout", rf"PUT {p}/step_00000002/manifest\.json", False, 1),
        ("answer", "ServiceUnavailable", rf"PUT {p}/step_00000002/manifest\.json", True, 1),
        ("answer", "SlowDown", rf"PUT {p}/step_00000004/__1_0", False, 1),  # write
        ("reset", None, rf"PUT {p}/step_00000004/manifest\.json", False, 1),  # commit
        ("answer", "429", rf"PUT {p}/latest", False, 2),  # commit (latest)
        ("answer", "502", rf"(DELETE {p}/step_00000002|POST /ckpt\?delete)", False, 1),
        ("hang", None, rf"PUT {p}/step_00000006/manifest\.json", False, 1),  # silence
        ("answer", "504", rf"PUT {p}/writer\.lease", False, 2),  # lease
    ]
    leg2 = [
        ("answer", "408", rf"GET /ckpt\?list-type=2&prefix={run}", False, 1),  # discovery
        ("short", None, rf"GET {p}/step_00000006/__", False, 2),  # load: a short read
        ("answer", "InternalError", rf"GET {p}/step_00000006/__", False, 3),  # load
    ]
    return leg1, leg2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def proxied(s3):
    """(the fault proxy in front of the S3 server, the environment that sends jobs to it)"""
    p = FaultProxy(s3.endpoint, flavour="s3")
    yield p, {**s3.env, "AWS_ENDPOINT_URL": p.endpoint}
    p.close()


def train(args: list, env: dict, log: Path, url: str, check: bool = True):
    """A 2-rank job of ARGS + args, logging to `log`, checkpointing to `url`."""
    args = [*ARGS, "--log_dir", str(log), "--checkpoint_dir", url, *args]
    return run_train(2, args, env=env, check=check, timeout=400)


def arm(proxy: FaultProxy, faults: list) -> None:
    for mode, answer, when, after, nth in faults:
        proxy.fault(mode, FAULT_S, when=when, after=after, nth=nth, answer=answer)


def test_s3_schedule_of_transient_faults_is_ridden_out_bit_exact(s3, proxied, data, tmp_path):
    (proxy, env), fs = proxied, s3fs_of(s3)
    ref_log = tmp_path / "ref" / "log"
    train(["--data_dir", str(data)], env, ref_log, "s3://ckpt/mref")
    leg1, leg2 = schedule("matrix")
    log, url = tmp_path / "matrix" / "log", "s3://ckpt/matrix"
    refused = proxy.refused
    arm(proxy, leg1)
    t0 = time.monotonic()
    first = train(["--data_dir", str(data), "--stop_at_step", "6"], env, log, url)
    assert not proxy.faulty(), [(f.mode, f.when.pattern) for f in proxy._faults]
    arm(proxy, leg2)
    second = train(["--data_dir", str(data), "--auto_resume"], env, log, url)
    assert not proxy.faulty(), [(f.mode, f.when.pattern) for f in proxy._faults]
    seconds, refused = time.monotonic() - t0, proxy.refused - refused
    out = first.stdout + second.stdout
    (tmp_path / "matrix.out").write_text(out + first.stderr + second.stderr)
    phases = set(re.findall(rf"WARNING: {url} failed during (.*?) \(attempt \d+\)", out))
    assert {"the resume (discovery)", "the resume (loading step 6)"} <= phases, phases
    assert any("commit" in p for p in phases) and any("write" in p for p in phases), phases
    assert losses(log) == losses(ref_log)  # bit for bit
    assert read_latest(fs, "ckpt/matrix") == step(MAX_STEPS)
    final = {name: download_step(fs, f"s3://ckpt/{name}/{step(MAX_STEPS)}",
                                 tmp_path / name / "final", tmp_path)
             for name in ("mref", "matrix")}
    assert_same_tensors(final["mref"], final["matrix"])
    print(f"\nS3 fault schedule ({len(leg1) + len(leg2)} faults of {FAULT_S}s): "
          f"{refused} requests refused, both legs in {seconds:.0f}s; phases {sorted(phases)}")


def gcs_schedule(run: str) -> tuple[list, list]:
    """schedule() for GCS: its uploads name the object in the body, its reads and deletes in
    the URL (`/` as %2F); each transient kind in GCS's JSON form."""
    up, o = r"POST /upload/storage/v1/b/ckpt/o\S* .*", f"/storage/v1/b/ckpt/o/{run}%2F"
    leg1 = [
        ("answer", "ServiceUnavailable", rf"{up}{run}/step_00000002/__0_0", False, 1),
        ("answer", "429", rf"{up}{run}/step_00000002/manifest\.json", False, 1),
        ("answer", "InternalError", rf"{up}{run}/step_00000002/manifest\.json", True, 1),
        ("reset", None, rf"{up}{run}/step_00000004/__1_0", False, 1),
        ("answer", "SlowDown", rf"{up}{run}/latest", False, 2),
        ("answer", "502", rf"DELETE {o}step_00000002", False, 1),  # retention
        ("hang", None, rf"{up}{run}/step_00000006/manifest\.json", False, 1),
        ("answer", "504", rf"{up}{run}/writer\.lease", False, 2),
    ]
    leg2 = [
        ("answer", "408", rf"GET /storage/v1/b/ckpt/o\?\S*prefix={run}", False, 1),
        ("short", None, rf"GET /download{o}step_00000006%2F__", False, 2),
        ("answer", "504", rf"GET /download{o}step_00000006%2F__", False, 3),
    ]
    return leg1, leg2


def test_gcs_schedule_of_transient_faults_is_ridden_out_bit_exact(gcs, data, tmp_path):
    import fsspec
    proxy = FaultProxy(gcs.endpoint, flavour="gcs")
    env = {**gcs.env, "STORAGE_EMULATOR_HOST": proxy.endpoint}
    try:
        ref_log, log, url = tmp_path / "ref" / "log", tmp_path / "g" / "log", "gs://ckpt/gmatrix"
        train(["--data_dir", str(data)], env, ref_log, "gs://ckpt/gref")
        leg1, leg2 = gcs_schedule("gmatrix")
        arm(proxy, leg1)
        t0 = time.monotonic()
        first = train(["--data_dir", str(data), "--stop_at_step", "6"], env, log, url)
        assert not proxy.faulty(), [(f.mode, f.when.pattern) for f in proxy._faults]
        arm(proxy, leg2)
        second = train(["--data_dir", str(data), "--auto_resume"], env, log, url)
        assert not proxy.faulty(), [(f.mode, f.when.pattern) for f in proxy._faults]
        seconds = time.monotonic() - t0
    finally:
        proxy.close()
    out = first.stdout + second.stdout
    phases = set(re.findall(rf"WARNING: {url} failed during (.*?) \(attempt \d+\)", out))
    assert losses(log) == losses(ref_log)  # bit for bit
    fs = fsspec.filesystem("gcs", skip_instance_cache=True, **gcs.storage_options)
    assert read_latest(fs, "ckpt/gmatrix") == step(MAX_STEPS)
    final = {name: download_step(fs, f"gs://ckpt/{name}/{step(MAX_STEPS)}",
                                 tmp_path / name / "final", tmp_path)
             for name in ("gref", "gmatrix")}
    assert_same_tensors(final["gref"], final["gmatrix"])
    print(f"\nGCS fault schedule ({len(leg1) + len(leg2)} faults of {FAULT_S}s): "
          f"{proxy.refused} requests refused, both legs in {seconds:.0f}s; "
          f"phases {sorted(phases)}")


@pytest.mark.parametrize("answer", ["AccessDenied", "NoSuchBucket", "BadRequest"])
def test_s3_permanent_answer_is_one_line_exit_2_at_once(proxied, data, tmp_path, answer):
    proxy, env = proxied
    url = f"s3://ckpt/perm-{answer.lower()}"
    proxy.fault("answer", None, when=rf"PUT /ckpt/perm-{answer.lower()}/step_00000002/__",
                answer=answer)
    try:
        t0 = time.monotonic()
        failed = train(["--data_dir", str(data)], env, tmp_path / "log", url, check=False)
        seconds = time.monotonic() - t0
    finally:
        proxy.heal()
    lines = [x for x in failed.stderr.splitlines() if x.startswith("dcp_train: error:")]
    assert len(lines) == 1, failed.stderr[-4000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", failed.stderr)) == {"2"}, failed.stderr
    assert url in lines[0] and "refused the request" in lines[0], lines[0]
    assert "WARNING" not in failed.stdout  # at once: not retried
    print(f"\n{answer}: exit 2 after {seconds:.0f}s of run: {lines[0]}")
