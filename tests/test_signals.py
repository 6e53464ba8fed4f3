"""Ctrl-C and a dead agent (issue 13, points 5 and 6), with real signals to real torchrun jobs.

    sigint      SIGINT to the torchrun pid (what Ctrl-C in its terminal does; torchrun forwards
                it): both ranks stop at the next step boundary with a checkpoint, exit 75, no
                KeyboardInterrupt; --auto_resume continues bit-exact
    second      a second SIGINT to each rank exits at once, 128+2, without a checkpoint; two
                SIGINTs to torchrun end the whole job within seconds too (torchrun sends the
                ranks SIGTERM as the second signal)
    orphan      SIGKILL of the torchrun pid alone: both ranks exit within seconds, `latest`
                names a committed checkpoint, --auto_resume continues bit-exact
Run: .venv/bin/python -m pytest tests/test_signals.py -q
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import (TINY, assert_same_tensors, descendants, load_checkpoint, losses, metrics,
                     run_train, start_train, wait_for, wait_job)
from soak import Console

from dcp_train.checkpoint.io.names import step_name
from dcp_train.checkpoint.layout import CheckpointDir

N = 10
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--max_steps", str(N), "--checkpoint_interval", "4"]


@pytest.fixture(scope="module")
def reference(base, data):
    """(losses, final tensors) of the uninterrupted run."""
    out = base / "ref"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(out / "log"),
                  "--checkpoint_dir", str(out / "ckpt")])
    return losses(out / "log"), load_checkpoint(out / "ckpt" / step_name(N), base)


def _args(tmp_path: Path, data: Path) -> list[str]:
    return [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
            "--checkpoint_dir", str(tmp_path / "ckpt")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in next(l for l in f if l.startswith("State:")).lower()
    except (OSError, StopIteration):
        return False


def _start(tmp_path, data, until=lambda lines: True, extra=()):
    """A running 2-rank job, its console and its two rank pids, once `until(lines)` holds
    after the first step line."""
    job = start_train(2, [*_args(tmp_path, data), *extra])
    console = Console(job)
    assert console.first_step.wait(timeout=300)
    wait_for(lambda: until(console.lines) or job.poll() is not None, timeout=120)
    assert job.poll() is None, "\n".join(console.lines[-40:])
    ranks = descendants(job.pid)
    assert len(ranks) == 2, ranks
    return job, console, ranks


def _resumed_run_matches_reference(tmp_path, data, reference) -> dict:
    """--auto_resume to step N; every train record of every launch equals the reference."""
    ref_losses, ref_final = reference
    run_train(2, [*_args(tmp_path, data), "--auto_resume"])
    train = metrics(tmp_path / "log", "train")
    assert {r["step"] for r in train} == set(range(1, N + 1))
    assert [(r["step"], r["loss"]) for r in train] == [(r["step"], ref_losses[r["step"]])
                                                       for r in train]
    assert_same_tensors(ref_final, load_checkpoint(tmp_path / "ckpt" / step_name(N), tmp_path))
    [resume] = metrics(tmp_path / "log", "resume")
    return resume


def test_ctrl_c_to_torchrun_checkpoints_exits_75_and_resumes_bit_exact(tmp_path, data,
                                                                        reference):
    job, console, _ = _start(tmp_path, data)
    os.kill(job.pid, signal.SIGINT)
    wait_job(job, console)
    out = "\n".join(console.lines)
    assert "Received 2 death signal, shutting down workers" in out  # torchrun forwarded it
    assert out.count("dcp_train: got SIGINT") == 1  # one line for the job, not one per rank
    assert "dcp_train: got SIGINT: stopping after this step with a checkpoint" in out
    assert "KeyboardInterrupt" not in out and "forcefully exiting" not in out  # ranks: exit 75
    m = re.search(r"^preempted: stopped after step (\d+) with a checkpoint; exit code 75 ", out,
                  re.M)
    assert m, out[-4000:]
    stop = int(m.group(1))
    assert (tmp_path / "ckpt" / "latest").read_text() == step_name(stop) + "\n"
    assert max(losses(tmp_path / "log")) == stop < N
    assert _resumed_run_matches_reference(tmp_path, data, reference)["step"] == stop


def test_a_second_ctrl_c_exits_at_once(tmp_path, data):
    # straight to the ranks (a launcher that delivers Ctrl-C to them): 128 + SIGINT. Steps of
    # 32 micro-batches (~1 s) so that the second signal surely comes before the step ends
    job, console, ranks = _start(tmp_path / "ranks", data, extra=["--total_batch_size", "8192"])
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    wait_for(lambda: any(l.startswith("dcp_train: got SIGINT") for l in console.lines),
             timeout=120)  # rank 0 ran its handler: the next SIGINT is its second

    def again() -> bool:
        # two signals before a rank's handler runs are one: a rank still alive gets another
        # until it is gone (any signal after the handled first one exits at once)
        for pid in ranks:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        return job.poll() is not None
    wait_for(again, timeout=120, interval=0.5)
    job.wait(timeout=60)
    console.join()
    out = "\n".join(console.lines)
    assert out.count("dcp_train: second signal: exiting without a checkpoint") == 1, out[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    assert codes and set(codes) == {str(128 + signal.SIGINT)}, out[-3000:]
    assert "KeyboardInterrupt" not in out

    # twice to torchrun: it sends the ranks SIGTERM as their second signal
    job, console, ranks = _start(tmp_path / "torchrun", data)
    os.kill(job.pid, signal.SIGINT)
    time.sleep(0.02)
    os.kill(job.pid, signal.SIGINT)
    t0 = time.monotonic()
    job.wait(timeout=60)
    wait_for(lambda: not any(_alive(p) for p in ranks), timeout=10)
    assert time.monotonic() - t0 < 10
    console.join()
    assert "KeyboardInterrupt" not in "\n".join(console.lines)
    ckpt = CheckpointDir(str(tmp_path / "torchrun" / "ckpt"), {})
    assert ckpt.find_latest() is None or ckpt.find_latest().note == ""


def test_ranks_exit_when_torchrun_is_killed_and_the_dir_resumes_bit_exact(tmp_path, data,
                                                                          reference):
    # kill the agent right after the first checkpoint: the ranks are training towards (or
    # saving) the next one. A val loss of 200 micro-batches after every step (~0.4 s here;
    # it changes no training bit) keeps an idle machine from finishing all 10 steps first.
    job, console, ranks = _start(tmp_path, data,
                                 until=lambda lines: any("committed" in l for l in lines),
                                 extra=("--eval_interval", "1", "--val_steps", "200"))
    os.kill(job.pid, signal.SIGKILL)  # the torchrun process alone
    job.wait(timeout=30)
    t0 = time.monotonic()
    wait_for(lambda: not any(_alive(p) for p in ranks), timeout=10)
    gone_s = time.monotonic() - t0
    console.join()
    out = "\n".join(console.lines)
    assert out.count(f"dcp_train: the torchrun agent (pid {job.pid}) is gone") == 2, out[-3000:]
    assert gone_s < 10
    # nothing half-done is committed: `latest` names a complete checkpoint, and every step
    # dir with a final name verifies
    ckpt = CheckpointDir(str(tmp_path / "ckpt"), {})
    found = ckpt.find_latest()
    assert found is not None and found.note == "", found
    committed, _ = ckpt.scan()
    assert all(ckpt.check(ckpt.step_path(s)) is None for s in committed)
    resume = _resumed_run_matches_reference(tmp_path, data, reference)  # the dead run's lease is taken over
    assert resume["step"] == found.step


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_signal_during_a_save_ends_the_run_at_that_save(tmp_path, data, mode):
    """sync: rank 1 gets SIGINT while it writes step 4's shards (a fault point, no timing):
    the run ends at that save (exit 75), step 5 is never trained, and rank 0 says the one
    line, naming rank 1. async: rank 0 gets SIGINT as step 6 begins; the stop's save is
    committed, and said, before the `preempted` line: lines in the order things happened."""
    import subprocess

    from helpers import child_env, torchrun_cmd, REPO
    fault, extra = (("after_shards:1:4:sigint", []) if mode == "sync" else
                    ("mid_step:0:6:sigint", ["--async_checkpoint"]))
    stop = 4 if mode == "sync" else 6
    proc = subprocess.run(torchrun_cmd(2, [*_args(tmp_path, data), *extra]), cwd=REPO,
                          env=child_env({"DCP_TRAIN_FAULT": fault}), capture_output=True,
                          text=True, timeout=300)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) == {"75"}, proc.stderr[-3000:]
    who = " (rank 1)" if mode == "sync" else ""
    assert proc.stderr.count("dcp_train: got SIGINT") == 1, proc.stderr[-3000:]
    assert f"dcp_train: got SIGINT{who}: stopping after this step with a checkpoint" in \
        proc.stderr
    lines = proc.stdout.splitlines()
    preempted = next(i for i, l in enumerate(lines) if l.startswith("preempted:"))
    assert lines[preempted].startswith(f"preempted: stopped after step {stop} with a checkpoint")
    committed = next(i for i, l in enumerate(lines)
                     if re.match(rf"step +{stop} \| checkpoint .* committed", l))
    assert committed < preempted, lines
    assert max(losses(tmp_path / "log")) == stop
    assert (tmp_path / "ckpt" / "latest").read_text() == step_name(stop) + "\n"
