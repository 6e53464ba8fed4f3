"""torchrun's own restarts, run for real:

- one node, torch's defaults: plain `torchrun --nproc_per_node=2 --max-restarts=1 ...
  --auto_resume`, rank 1 SIGKILLed once a train record of step KILL_AT is in metrics.jsonl:
  torchrun restarts the group, which resumes and ends with exit 0, bit for bit the
  uninterrupted run;
- two "nodes" on this machine (two torchrun agents, --nnodes=2, c10d rendezvous on
  127.0.0.1), torch's defaults: node 2's worker SIGKILLed, both agents restart their workers;
- the same two nodes, node 2's agent SIGKILLed with its worker and relaunched: the survivor's
  agent restarts its worker and both join a new round (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
  which torch's own agent needs for a relaunched node: see that test).

Both print the seconds from the kill to the next optimizer step (the `time` of the first
train record after the kill). Cause of the failure they guard against: torch 2.13 keeps one
store for every attempt, and the process group's keys were the same in each
(distributed.attempt_store).

Run: .venv/bin/python -m pytest tests/test_restarts.py -q -s
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (REPO, TINY, assert_same_run, child_env, descendants, finish_job, free_port,
                     kill_job, metrics, run_dirs, run_train, wait_for, write_shards)

MAX_STEPS, KILL_AT = 16, 10
ARGS = TINY + ["--dropout", "0", "--batch_size", "4", "--total_batch_size", "256",
               "--max_steps", str(MAX_STEPS), "--checkpoint_interval", "4", "--seed", "4321",
               "--stall_timeout", "60"]


def agent(torchrun_args: list[str], args: list[str], env: dict | None = None
          ) -> subprocess.Popen:
    """A torchrun agent (its own session, so a test can kill it and its workers)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args,
           "-m", "dcp_train.main", "--auto_resume", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def logged_step(log: Path, step: int) -> bool:
    return any(r["kind"] == "train" and r["step"] >= step for r in metrics(log))


def worker_of_rank(rank: int, *agents: subprocess.Popen) -> int | None:
    """The pid of the dcp_train.main process with RANK=rank below one of `agents` (from
    /proc; never a process of another job on this machine), or None."""
    for pid in [p for a in agents for p in descendants(a.pid)]:
        d = Path(f"/proc/{pid}")
        try:
            if b"dcp_train.main" in (d / "cmdline").read_bytes() and \
                    f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def recovery_s(log: Path, killed_at: float) -> float:
    """Seconds from the kill to the first optimizer step of the restarted attempt (the first
    train record after its resume record; a step the survivors finished just before they
    noticed the kill does not count)."""
    records = metrics(log)
    resumed = next(i for i, r in enumerate(records)
                   if r["kind"] == "resume" and r["time"] > killed_at)
    return next(r["time"] for r in records[resumed:] if r["kind"] == "train") - killed_at


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic shards, and the uninterrupted run every restarted one must equal."""
    shards = write_shards(tmp_path_factory.mktemp("data"))
    reference = tmp_path_factory.mktemp("reference")
    run_train(2, ARGS + run_dirs(reference, shards))
    return shards, reference


def test_one_node_rank_killed_torchrun_restarts(tmp_path, data):
    (data, reference), run = data, tmp_path / "run"
    job = agent(["--nproc_per_node=2", "--max-restarts=1", "--master_addr=127.0.0.1",
                 f"--master_port={free_port()}"], ARGS + run_dirs(run, data))
    try:
        wait_for(lambda: logged_step(run / 'log', KILL_AT) or job.poll() is not None, 240)
        victim = worker_of_rank(1, job)
        assert victim is not None and job.poll() is None
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        kill_job(job)
        raise
    finish_job(job)
    assert sum(r["kind"] == "resume" for r in metrics(run / 'log')) == 1
    print(f"\none node: kill to next step {recovery_s(run / 'log', killed_at):.2f} s")
    assert_same_run(run, reference, tmp_path, MAX_STEPS)


def test_two_nodes_worker_killed_torchrun_restarts(tmp_path, data):
    """Two agents, torch's defaults: node 2's worker is SIGKILLed; both agents restart their
    workers into a new rendezvous round, on the store the agents share with them."""
    (data, reference), run = data, tmp_path / "run"
    with two_agents(run, data, {}) as (host, other):
        killed_at = time.time()
        os.kill(worker_of_rank(1, host, other), signal.SIGKILL)
        for proc in (other, host):
            finish_job(proc)
    assert sum(r["kind"] == "resume" for r in metrics(run / "log")) == 1
    print(f"\ntwo nodes, worker killed: kill to next step "
          f"{recovery_s(run / 'log', killed_at):.2f} s")
    assert_same_run(run, reference, tmp_path, MAX_STEPS)


def test_two_nodes_one_agent_killed_and_relaunched(tmp_path, data):
    """Node 2's agent and worker are SIGKILLed and the agent relaunched. This needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the agents (launch/elastic.sh sets it): under
    torch 2.13's default the surviving leader agent keeps the store address of its first
    round and never publishes it to the new round, so the relaunched agent waits for it in
    torch's own rendezvous and both agents give up (docs/launch.md)."""
    (data, reference), run = data, tmp_path / "run"
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with two_agents(run, data, env) as (host, other):
        killed_at = time.time()
        kill_job(other)  # the agent and its worker, SIGKILL
        other = agent(RDZV + [f"--rdzv_endpoint=127.0.0.1:{host.port}"],
                      ARGS + run_dirs(run, data), env)  # the "node" comes back
        try:
            for proc in (other, host):
                finish_job(proc)
        finally:
            if other.poll() is None:
                kill_job(other)
    assert sum(r["kind"] == "resume" for r in metrics(run / "log")) == 1
    print(f"\ntwo nodes, agent relaunched: kill to next step "
          f"{recovery_s(run / 'log', killed_at):.2f} s")
    assert_same_run(run, reference, tmp_path, MAX_STEPS)


RDZV = ["--nnodes=2", "--nproc_per_node=1", "--max-restarts=1", "--rdzv_backend=c10d",
        "--rdzv_id=test-restarts"]


@contextmanager
def two_agents(run: Path, data: Path, env: dict):
    """Two torchrun agents as two nodes (the first hosts the rendezvous store, which must
    survive), once step KILL_AT is logged; both killed on the way out if still running."""
    port = free_port()
    rdzv, args = RDZV + [f"--rdzv_endpoint=127.0.0.1:{port}"], ARGS + run_dirs(run, data)
    host = agent(rdzv, args, env)
    host.port = port
    procs = [host]
    try:
        wait_for(lambda: _listening(port) or host.poll() is not None, 120)
        procs.append(agent(rdzv, args, env))
        wait_for(lambda: logged_step(run / "log", KILL_AT) or
                 any(p.poll() is not None for p in procs), 240)
        assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_job(proc)


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
