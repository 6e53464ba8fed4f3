"""Store outages: a bucket that refuses or does not answer is ridden out or named in one line.

Real 2-rank torchrun jobs (TINY model, 8 steps, a checkpoint every 2) against the moto S3
server, reached through tests/fault_proxy.py, an HTTP proxy that answers 503 SlowDown, resets
connections or hangs without answering, from a given request on, for a given time.

    ref       healthy bucket: the reference of every comparison (same test run)
    refuse    the bucket refuses every request for OUTAGE_S (a) from the run's first request,
              (b) at step 4's manifest PUT (right before the commit), then --auto_resume with
              (d) from the third shard GET of the resume (its load), (c) right after step 6's
              commit: exit 0 both times, losses and final state bit-identical to ref, the
              ride-out named each phase in a WARNING line
    budget    --store_retry_budget 10, the bucket refusing from step 4's commit on: one line,
              exit 69, step 2 committed and `latest`; healed, --auto_resume is bit-exact
    hang      --stall_timeout 30, the bucket silent from step 4's commit on: exit 69 within
              the stall timeout (+ margin), "did not answer"
    tiers     two tiers, a committed local checkpoint, the bucket refusing at the start: resumes
              from local, trains; the bucket then hangs (local retention stays within keep + 2)
              and heals: replication catches up, the bucket ends at step 8, bit-exact

Run: .venv/bin/python -m pytest tests/test_outages.py -q
"""

from __future__ import annotations

import functools
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from helpers import (REPO, TINY, assert_same_tensors, child_env, committed_steps, download_step,
                     error_lines, exit_codes, kill_job, losses, read_latest, s3fs_of,
                     start_train, torchrun_cmd, train_to, wait_for)

from dcp_train.checkpoint.io.names import step_name as step

OUTAGE_S = 20
MAX_STEPS = 8
ARGS = [*TINY, "--dropout", "0.1", "--checkpoint_interval", "2", "--max_steps", str(MAX_STEPS),
        "--batch_size", "2", "--total_batch_size", "384", "--seed", "4321"]


@pytest.fixture(scope="module")
def proxy(s3):
    p = FaultProxy(s3.endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def env(s3, proxy) -> dict:
    return {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}


run = functools.partial(train_to, 2, args=ARGS, timeout=400)


def workers_stderr(text: str) -> list[str]:
    """The lines of a failed job's stderr that are not torchrun's own report (its logging
    lines, the ChildFailedError traceback and the failure summary): what the ranks wrote."""
    report = text.find("Traceback (most recent call last)")
    lines = text[:report if report >= 0 else len(text)].splitlines()
    return [x for x in lines if x.strip() and not re.match(r"^[WIE]\d{4} |^\[[WIE]\d{4}|^\*+$|"
                                                          r"^Setting OMP_NUM_THREADS", x)]


@pytest.fixture(scope="module")
def ref(s3, env, data, base) -> Path:
    log = base / "ref" / "log"
    run(["--data_dir", str(data)], env, log, "s3://ckpt/ref")
    return log


def test_refusals_before_during_after_commit_and_during_resume(s3, proxy, env, ref, data,
                                                               base):
    log, url, fs = base / "refuse" / "log", "s3://ckpt/refuse", s3fs_of(s3)
    proxy.fault("refuse", OUTAGE_S, when=r"refuse")  # (a) from the run's first request
    proxy.fault("refuse", OUTAGE_S, when=r"PUT /ckpt/refuse/step_00000004/manifest\.json")  # (b)
    t0 = time.monotonic()
    first = run(["--data_dir", str(data), "--stop_at_step", "4"], env, log, url)
    first_s = time.monotonic() - t0
    # (d): discovery reads one shard's header, the load reads all four
    proxy.fault("refuse", OUTAGE_S, when=r"GET /ckpt/refuse/step_00000004/__", nth=3)
    proxy.fault("refuse", OUTAGE_S, after=True,
                when=r"PUT /ckpt/refuse/step_00000006/manifest\.json")  # (c)
    t0 = time.monotonic()
    second = run(["--data_dir", str(data), "--auto_resume"], env, log, url)
    second_s = time.monotonic() - t0
    assert not proxy.faulty()  # every fault came, and is over
    out = first.stdout + second.stdout
    (base / "refuse.out").write_text(out)
    phases = set(re.findall(rf"WARNING: {url} failed during (.*?) \(attempt \d+\)", out))
    # (a) meets the first run's start: a fresh run, named as such (ride_out.FRESH)
    assert phases >= {"the start of a fresh run (checking --checkpoint_dir)",
                      "the save of step 4 (commit)",
                      "the resume (loading step 4)", "the save of step 6 (commit)"}, \
        (phases, base / "refuse.out")
    assert losses(log) == losses(ref)  # bit for bit
    assert read_latest(fs, "ckpt/refuse") == step(MAX_STEPS)
    final = {name: download_step(fs, f"s3://ckpt/{name}/{step(MAX_STEPS)}",
                                 base / name / "final", base) for name in ("ref", "refuse")}
    assert_same_tensors(final["ref"], final["refuse"])  # model and optimizer, bit for bit
    print(f"\nrefusals of {OUTAGE_S}s: stop at 4 in {first_s:.0f}s, resume to 8 in "
          f"{second_s:.0f}s, {proxy.refused} requests refused")


def test_refusing_past_the_budget_is_one_line_exit_69_then_resumes(s3, proxy, env, ref,
                                                                    data, base):
    log, url, fs = base / "budget" / "log", "s3://ckpt/budget", s3fs_of(s3)
    proxy.fault("refuse", None, when=r"PUT /ckpt/budget/step_00000004/manifest\.json")
    t0 = time.monotonic()
    failed = run(["--data_dir", str(data), "--store_retry_budget", "10"], env, log, url,
                 check=False)
    seconds = time.monotonic() - t0
    proxy.heal()
    lines = error_lines(failed.stderr)
    assert set(exit_codes(failed.stderr).values()) == {69} and len(lines) == 1, \
        failed.stderr[-4000:]
    for words in (url, "the save of step 4 (commit)", "--store_retry_budget 10", "SlowDown"):
        assert words in lines[0], lines[0]
    assert workers_stderr(failed.stderr) == lines, failed.stderr[-6000:]  # no asyncio noise
    assert read_latest(fs, "ckpt/budget") == step(2)
    assert not fs.exists(f"ckpt/budget/{step(4)}/manifest.json")  # never committed
    run(["--data_dir", str(data), "--auto_resume"], env, log, url)
    assert losses(log) == losses(ref)
    print(f"\nbudget 10 s: exit 69 after {seconds:.0f}s of run: {lines[0]}")


def test_a_silent_bucket_is_named_within_the_stall_timeout(s3, proxy, env, data, base):
    log, url = base / "hang" / "log", "s3://ckpt/hang"
    proxy.fault("hang", None, when=r"PUT /ckpt/hang/step_00000004/manifest\.json")
    job = start_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                          "--checkpoint_dir", url, "--stall_timeout", "30"], env=env)
    try:
        out, _ = job.communicate(timeout=300)
        ended = time.monotonic()
    finally:
        proxy.heal()
    hung_at = next(t for t, line, mode in proxy.log if mode == "hang")
    silent_s = ended - hung_at
    lines = error_lines(out)
    assert set(exit_codes(out).values()) == {69} and len(lines) == 1, out[-4000:]
    for words in (url, "did not answer for", "the save of step 4 (commit)"):
        assert words in lines[0], lines[0]
    assert silent_s < 30 + 15, silent_s
    print(f"\nsilent bucket named {silent_s:.0f}s after it went silent: {lines[0]}")


def test_two_tiers_bucket_down_at_start_resumes_local_and_catches_up(s3, proxy, env, ref, data,
                                                                     base):
    run_dir, url, fs = base / "tiers", "s3://ckpt/tiers", s3fs_of(s3)
    tiers = ["--local_checkpoint_dir", str(run_dir / "local"), "--local_checkpoint_interval",
             "1", "--checkpoint_interval", "3", "--keep_last_n_local_checkpoints", "1",
             "--stall_timeout", "30", "--data_dir", str(data)]
    log, out_path = run_dir / "log", run_dir / "resume.out"
    run([*tiers, "--stop_at_step", "3"], env, log, url)
    assert read_latest(fs, "ckpt/tiers") == step(3)
    proxy.fault("refuse", None)  # down when the job starts
    with open(out_path, "w") as out:
        job = subprocess.Popen(torchrun_cmd(2, [*ARGS, *tiers, "--log_dir", str(log),
                                                "--checkpoint_dir", url, "--auto_resume",
                                                "--eval_interval", "1", "--val_steps", "200"]),
                               cwd=REPO, env=child_env(env), stdout=out,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    text = lambda: out_path.read_text()  # noqa: E731
    held = []

    def watch():  # the local tier's committed checkpoints, all along
        while job.poll() is None:
            held.append(len(committed_steps(run_dir / "local")))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:  # refusing until a replication failed loudly, then silent for two more requests
        wait_for(lambda: "WARNING: replicating step" in text() or job.poll() is not None,
                 timeout=200)
        proxy.heal()
        hung = len([1 for _, _, mode in proxy.log if mode == "hang"])
        proxy.fault("hang", None)
        wait_for(lambda: len([1 for _, _, mode in proxy.log if mode == "hang"]) >= hung + 2
                 or job.poll() is not None, timeout=200)
        silent_until = max(committed_steps(run_dir / "local"), default=0)
        proxy.heal()
        job.wait(timeout=300)
    finally:
        proxy.heal()
        kill_job(job)
    watcher.join()
    out = text()
    assert job.returncode == 0, out[-4000:]
    assert "does not answer at the start" in out, out[-4000:]
    assert "resumed from the local tier: local step 3 is on every node; the durable tier did " \
        "not answer" in out, out[-4000:]
    # keep 1 + the 2 steps replication still has to copy, + the step being committed until
    # its retention has run
    assert max(held) <= 1 + 2 + 1, held
    assert read_latest(fs, "ckpt/tiers") == step(MAX_STEPS)
    assert losses(log) == losses(ref)
    # the outage said twice: one WARNING when it started, one line when it ended
    assert out.count("WARNING: replicating step") == 1, out[-4000:]
    assert "works again after" in out, out[-4000:]
    print(f"\ntwo tiers: local checkpoints held at most {max(held)} (keep 1); the bucket "
          f"refused, then was silent until local step {silent_until}")


def test_store_options_defaults_and_the_users_win():
    """The defaults every request gets, and --storage_options over them key by key."""
    from dcp_train.store import options as store_options
    s3 = store_options.merged("s3://b/run", {"endpoint_url": "http://x",
                                             "config_kwargs": {"read_timeout": 99}}, 300)
    assert s3 == {"endpoint_url": "http://x", "config_kwargs": {
        "connect_timeout": 10.0, "read_timeout": 99,
        "retries": {"mode": "standard", "total_max_attempts": 2}}}
    assert store_options.merged("s3://b/run", {}, 30)["config_kwargs"]["read_timeout"] == 1.875
    assert store_options.merged("gs://b/run", None, 300) == {"requests_timeout": 18.75}
    assert store_options.merged("/tmp/run", {"a": 1}) == {"a": 1}
    assert store_options.merged("memory://run", None) == {}


def test_server_errors_are_ridden_out_other_errors_are_not():
    """A 500/502/504 (as s3fs and botocore raise them) is a transient store failure; a missing
    object or a denied request is not."""
    import errno

    from botocore.exceptions import ClientError

    from dcp_train.checkpoint.ride_out import trouble
    internal = ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an "
                                      "internal error. Please try again."}}, "PutObject")
    for e in (OSError(errno.EREMOTEIO, "Internal Server Error"), internal,
              OSError(errno.EIO, "502 Bad Gateway")):
        assert trouble(e) is not None and not trouble(e).silent, e
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                         "GetObject")
    for e in (FileNotFoundError(errno.ENOENT, "no such key"), denied):
        assert trouble(e) is None, e


SILENT_STALL = 8  # --stall_timeout of the silent-bucket test; the bucket is silent 3x that


def test_two_tiers_a_silent_bucket_costs_training_nothing(s3, proxy, env, data, base):
    """Two tiers; once step 40 is logged the bucket accepts connections and answers nothing
    for 3 x --stall_timeout (the proxy holds every request), then heals by itself. Training
    never waits for it: exit 0, steps/s during the silence >= 0.8 x before (from the train
    records' `time`), the outage said once when it starts and once when it ends, and the
    bucket catches up: its `latest` is the final step and `dcp-ckpt verify` passes."""
    from dcp_train.checkpoint.io.storage import Storage
    from dcp_train.tools import ckpt
    from helpers import metrics

    steps, url = 400, "s3://ckpt/silent"
    run_dir = base / "silent"
    log, out_path = run_dir / "log", run_dir / "silent.out"
    run_dir.mkdir()
    args = [*ARGS, "--max_steps", str(steps), "--checkpoint_interval", "20",
            "--local_checkpoint_dir", str(run_dir / "local"), "--local_checkpoint_interval",
            "10", "--keep_last_n_local_checkpoints", "2", "--stall_timeout", str(SILENT_STALL),
            "--data_dir", str(data), "--log_dir", str(log), "--checkpoint_dir", url]
    with open(out_path, "w") as out:
        job = subprocess.Popen(torchrun_cmd(2, args), cwd=REPO, env=child_env(env), stdout=out,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    train = lambda: [r for r in metrics(log) if r["kind"] == "train"]  # noqa: E731
    try:
        wait_for(lambda: any(r["step"] >= 40 for r in train()) or job.poll() is not None,
                 timeout=240)
        silent_s = 3 * SILENT_STALL
        t0 = time.time()
        proxy.fault("hang", silent_s)  # starts now, heals by itself
        job.wait(timeout=400)
    finally:
        proxy.heal()
        kill_job(job)
    out = out_path.read_text()
    assert job.returncode == 0, out[-4000:]
    records = train()
    assert records[-1]["step"] == steps and records[-1]["time"] > t0 + silent_s, \
        "the run ended before the silence did: give it more steps"
    before = [r for r in records if r["step"] > 10 and r["time"] <= t0]
    during = [r for r in records if t0 < r["time"] <= t0 + silent_s]
    rate_before = (len(before) - 1) / (before[-1]["time"] - before[0]["time"])
    rate_during = len(during) / silent_s
    print(f"\nsilent bucket for {silent_s}s: {rate_before:.2f} steps/s before, "
          f"{rate_during:.2f} during; {proxy.refused} requests held")
    assert rate_during >= 0.8 * rate_before, (rate_before, rate_during)
    # said when it starts and when it ends, not per retry: one WARNING and one line back per
    # stretch of failures (a phase whose requests were answered just before the silence can
    # succeed in its first second and split it in two)
    started = [x for x in out.splitlines() if "WARNING: replicating step" in x]
    ended = [x for x in out.splitlines() if "replication to s3://ckpt/silent works again" in x]
    (base / "silent.out").write_text(out)  # kept for a look after a failure
    assert 1 <= len(started) == len(ended) <= 2, (len(started), len(ended), out[-6000:])
    assert out.count("WARNING: renewing the writer lease") <= 1, out[-6000:]
    fs = s3fs_of(s3)
    assert read_latest(fs, "ckpt/silent") == step(steps), (read_latest(fs, "ckpt/silent"),
                                                           out[-6000:])
    storage = Storage(url, s3.storage_options)
    assert ckpt.verify(storage, f"{url}/{step(steps)}") == []
