"""Stalls: a rank or a save process that stops (a real SIGSTOP) ends the job within
--stall_timeout with one line naming it; the writer lease of a dead job blocks a relaunch no
longer than the stall timeout. Real torchrun, 2 ranks on CPU/gloo, the TINY model, 6 steps, a
checkpoint every 2 steps.

    a. rank 1 stops at the start of step 5 (after step 4 is committed): exit 69 naming rank 1
       within 30 s + margin; --auto_resume is bit-exact with the uninterrupted run; the same
       for rank 0 (--stall_timeout 10), named by rank 1
    b. rank 1 stops inside the save of step 4 (its shards written, nothing committed): the same,
       step 4 never committed, `latest` still step 2
    c. rank 1's async save process stops inside the save of step 4: exit 69 naming "the save
       process of rank 1", step 4 never committed
    d. a job SIGKILLed, its lease seen as another host's (as by a pod relaunched on another
       node): the relaunch waits the lease out within its --stall_timeout, says so once, and
       finishes bit-exact; a holder on another host that keeps renewing is refused after
       the wait (no torchrun)

The SIGSTOP comes from the fault hook `DCP_TRAIN_FAULT=POINT:RANK:STEP:stop` (job/faults.py):
the process sends it to itself at a known point; the test sees the stopped process in /proc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dcp_train.checkpoint.io.lease import LeaseError, WriterLease
from dcp_train.checkpoint.io.storage import Storage
from helpers import (REPO, TINY, assert_same_run, child_env, committed_steps, descendants,
                     exit_codes, kill_job, metrics, run_train, torchrun_cmd, wait_for)

N = 6
STALL = 30
MARGIN = 25  # detection (1.5 heartbeats), the line, torchrun noticing and reporting
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--max_steps", str(N), "--checkpoint_interval", "2", "--keep_last_n_checkpoints", "1",
        "--stall_timeout", str(STALL)]


@pytest.fixture(scope="module")
def reference(base, data) -> Path:
    """The uninterrupted run (log/ and ckpt/) every resumed run is compared with."""
    out = base / "ref"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(out / "log"),
                  "--checkpoint_dir", str(out / "ckpt")])
    return out


def job_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [*ARGS, "--data_dir", str(data), "--log_dir", str(out / "log"),
            "--checkpoint_dir", str(out / "ckpt"), *extra]


def is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(l.startswith("State:") and "T" in l.split()[1] for l in f)
    except OSError:
        return False


def run_until_stall(out: Path, args: list[str], fault: str) -> dict:
    """Run a job with DCP_TRAIN_FAULT=fault; return its exit, output, the seconds from the
    moment a process of it was seen stopped to the end of the whole job, and that pid."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout", "w") as so, open(out / "stderr", "w") as se:
        proc = subprocess.Popen(torchrun_cmd(2, args), cwd=REPO, stdout=so, stderr=se,
                                env=child_env({"DCP_TRAIN_FAULT": fault}),
                                start_new_session=True)
        try:
            seen = {}

            def one_stopped() -> bool:
                for pid in descendants(proc.pid):
                    if is_stopped(pid):
                        seen.update(pid=pid, at=time.monotonic())
                        return True
                return proc.poll() is not None
            wait_for(one_stopped, timeout=240, interval=0.05)
            assert seen, "no process of the job stopped"
            proc.wait(timeout=STALL + 120)
            ended = time.monotonic() - seen["at"]
        finally:
            if proc.poll() is None:
                kill_job(proc)
    stderr, stdout = (out / "stderr").read_text(), (out / "stdout").read_text()
    print(f"\n{fault}: stopped pid {seen['pid']}; the job ended {ended:.1f}s later")
    return {"rc": proc.returncode, "stderr": stderr, "stdout": stdout, "ended_s": ended,
            "pid": seen["pid"]}


def the_line(result: dict) -> str:
    """The job's one `dcp_train: error:` line (said once, by one rank)."""
    text = result["stderr"] + result["stdout"]
    assert text.count("dcp_train: error:") == 1, text[-6000:]
    return next(l for l in result["stderr"].splitlines() if l.startswith("dcp_train: error:"))


def assert_stall_ended(result: dict, who: str, stall: int = STALL) -> str:
    line = the_line(result)
    assert who in line and f"did not answer for {stall} s" in line, line
    assert result["rc"] != 0
    codes = exit_codes(result["stderr"] + result["stdout"])
    assert 69 in codes.values(), codes
    assert result["ended_s"] <= stall + MARGIN, result["ended_s"]
    assert not os.path.exists(f"/proc/{result['pid']}") or not is_stopped(result["pid"])
    return line


def test_rank_stopped_while_training(base, data, reference, tmp_path):
    out = base / "a"
    result = run_until_stall(out, job_args(out, data), "mid_step:1:5:stop")
    line = assert_stall_ended(result, "rank 1 ")
    assert "during step 5" in line and "the last committed checkpoint is step 4" in line, line
    assert "--auto_resume" in line
    assert committed_steps(out / "ckpt") == [4]
    run_train(2, job_args(out, data, "--auto_resume"))
    assert [r["step"] for r in metrics(out / "log", "resume")] == [4]
    assert_same_run(out, reference, tmp_path, N)


def test_rank_0_stopped_is_named_by_rank_1(base, data):
    """The rank that stalled is rank 0 (the lease holder, rank 0 of every decision): rank 1
    names it, without waiting for rank 0 to speak first."""
    out = base / "a0"
    result = run_until_stall(out, job_args(out, data, "--stall_timeout", "10"),
                             "mid_step:0:5:stop")
    line = assert_stall_ended(result, "rank 0 ", stall=10)
    assert "during step 5" in line and "the last committed checkpoint is step 4" in line, line
    assert result["ended_s"] <= 10 + 10, result["ended_s"]  # no 5 s wait for rank 0's words


def test_rank_stopped_during_a_save(base, data, reference, tmp_path):
    out = base / "b"
    result = run_until_stall(out, job_args(out, data), "after_shards:1:4:stop")
    line = assert_stall_ended(result, "rank 1 ")
    assert "during the save of step 4" in line, line
    assert "the last committed checkpoint is step 2" in line, line
    assert committed_steps(out / "ckpt") == [2]  # step 4 half-written, never committed
    assert (out / "ckpt" / "latest").read_text().strip() == "step_00000002"
    run_train(2, job_args(out, data, "--auto_resume"))
    assert [r["step"] for r in metrics(out / "log", "resume")] == [2]
    assert_same_run(out, reference, tmp_path, N)


def test_save_process_stopped(base, data):
    out = base / "c"
    result = run_until_stall(out, job_args(out, data, "--async_checkpoint"),
                             "after_shards:1:4:stop")
    line = assert_stall_ended(result, "the save process of rank 1 ")
    assert "during the save of step 4" in line and "step 4 was not committed" in line, line
    assert "the last committed checkpoint is step 2" in line, line
    assert committed_steps(out / "ckpt") == [2]
    assert (out / "ckpt" / "latest").read_text().strip() == "step_00000002"


def test_dead_jobs_lease_waited_out_within_the_stall_timeout(base, data, reference, tmp_path):
    stall = 20
    out = base / "d"
    args = job_args(out, data, "--stall_timeout", str(stall))
    first = subprocess.Popen(torchrun_cmd(2, args), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True,
                             env=child_env({"DCP_TRAIN_FAULT": "mid_step:0:5:pause"}))
    latest = out / "ckpt" / "latest"
    try:
        wait_for(lambda: latest.exists() and latest.read_text().strip() == "step_00000004",
                 timeout=240)
    finally:
        kill_job(first)
    lease = out / "ckpt" / "writer.lease"
    holder = json.loads(lease.read_text())
    assert holder["timeout_s"] == stall
    lease.write_text(json.dumps({**holder, "host": "another-node"}))  # its pid cannot be checked
    t0 = time.monotonic()
    proc = run_train(2, [*args, "--auto_resume"])
    took = time.monotonic() - t0
    waits = [l for l in proc.stdout.splitlines() if "waiting" in l and "writer lease" in l]
    assert len(waits) == 1, proc.stdout[-3000:]
    waited = float(re.search(r"waiting (\d+)s", waits[0]).group(1))
    print(f"\nrelaunch: {waits[0]}\nrelaunch took {took:.1f}s (waited {waited:.0f}s)")
    assert 0 < waited <= stall
    assert took <= stall + 60
    assert json.loads(lease.read_text() if lease.exists() else "{}").get("host") != "another-node"
    assert_same_run(out, reference, tmp_path, N)


def test_a_live_lease_of_another_host_is_refused_after_the_wait(tmp_path):
    """The other side of test d: a holder on another host that keeps renewing (a real thread
    renewing a real lease file) is alive: the newcomer waits, sees the renewal and refuses."""
    storage = Storage(str(tmp_path))
    holder = WriterLease(storage, timeout_s=2.0)
    holder.mine["host"] = "another-node"
    holder.acquire()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.3):
            holder.refresh()  # every timeout/4 = 0.5 s
    thread = threading.Thread(target=renew)
    thread.start()
    said = []
    try:
        newcomer = WriterLease(storage, timeout_s=2.0, say=said.append)
        wait = newcomer.expiry_wait()
        assert 0 < wait <= 2.0 + 0.5
        time.sleep(wait)
        with pytest.raises(LeaseError, match="is in use by run"):
            newcomer.check()
    finally:
        stop.set()
        thread.join()
    assert len(said) == 1 and "waiting" in said[0], said
    # the holder is dead now: its lease expires within its timeout and is taken over
    newcomer = WriterLease(storage, timeout_s=2.0)
    wait = newcomer.expiry_wait()
    assert 0 < wait <= 2.0 + 0.5
    time.sleep(wait)
    newcomer.acquire()
    assert json.loads((tmp_path / "writer.lease").read_text())["host"] != "another-node"
