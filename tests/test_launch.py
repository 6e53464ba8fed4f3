"""The launch/ scripts, run for real, against one uninterrupted 2-rank run (module fixture):

- elastic.sh (torchrun --nnodes=1:1 --max-restarts=2, c10d): one worker is SIGKILLed after the
  first checkpoint is committed; torchrun restarts the group, which resumes from `latest` and
  ends with the reference's per-step losses and final model/optimizer tensors, bit for bit.
- multi_node.sh twice (two "nodes" of 1 rank, c10d rendezvous on 127.0.0.1) trains to step 12
  with --stop_at_step, then single_node.sh (--standalone, 2 ranks) resumes and finishes: same
  world size 2, so again bit-exact against the reference.
- dcp_train.plot on the elastic run's metrics (train/val curves, checkpoint and resume lines).
- slurm.sbatch needs SLURM: only its syntax and its #SBATCH contract are checked.

Run: .venv/bin/python -m pytest tests/test_launch.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcp_train.checkpoint.io.storage import Storage
from dcp_train.tools import ckpt
from helpers import (REPO, TINY, assert_same_run, child_env, finish_job, free_port, kill_job,
                     losses, metrics, of_kind, run_dirs, run_train, wait_for)

MAX_STEPS = 24
ARGS = TINY + ["--dropout", "0", "--batch_size", "4", "--total_batch_size", "256",
               "--max_steps", str(MAX_STEPS), "--checkpoint_interval", "4", "--seed", "1234",
               "--eval_interval", "8", "--val_steps", "2"]
FINAL = f"step_{MAX_STEPS:08d}"


def launch(script: str, env: dict, args: list[str]) -> subprocess.Popen:
    """bash launch/<script> args, with torchrun from this venv, in its own process group."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return subprocess.Popen(["bash", str(REPO / "launch" / script), *args], cwd=REPO,
                            env=child_env({**env, "PATH": path}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    t0 = time.monotonic()
    out = finish_job(proc, timeout)
    print(f"{proc.args[1]} took {time.monotonic() - t0:.1f}s")
    return out


def worker_pids(agent_pid: int) -> list[int]:
    """The dcp_train.main processes that torchrun (agent_pid) started, from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and b"dcp_train.main" in cmdline:
            pids.append(int(d.name))
    return sorted(pids)


def assert_same_committed_run(root: Path, ref: Path, tmp: Path) -> None:
    """helpers.assert_same_run, and the final checkpoint verifies against its manifest."""
    assert_same_run(root, ref, tmp, MAX_STEPS)
    assert ckpt.verify(Storage(root / "ckpt"), str(root / "ckpt" / FINAL)) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    root = tmp_path_factory.mktemp("reference")
    run_train(2, ARGS + run_dirs(root, data))
    assert sorted(losses(root / "log")) == list(range(1, MAX_STEPS + 1))
    return root


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, data) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    env = {"NPROC": "2", "MIN_NODES": "1", "MAX_NODES": "1", "MAX_RESTARTS": "2",
           "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": "test-elastic"}
    job = launch("elastic.sh", env, ARGS + run_dirs(root, data))
    try:
        wait_for(lambda: (root / "ckpt" / "latest").exists() or job.poll() is not None, 120,
                 interval=0.02)
        victims = worker_pids(job.pid)  # bash exec'd torchrun: job.pid is the agent
        assert len(victims) == 2, victims
        os.kill(victims[0], signal.SIGKILL)
    except BaseException:
        kill_job(job)
        raise
    finish(job)
    return root


def test_elastic_restart_resumes_bit_exact(elastic_run, reference, tmp_path):
    resumes = metrics(elastic_run / "log", "resume")
    assert len(resumes) == 1, "the killed worker did not cause exactly one restart"
    r = resumes[0]
    assert 4 <= r["step"] < MAX_STEPS and r["step"] % 4 == 0
    assert (r["world_size_saved"], r["world_size"]) == (2, 2)
    assert_same_committed_run(elastic_run, reference, tmp_path)


def test_two_nodes_then_one_node(reference, data, tmp_path):
    env = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": "test-two-nodes"}
    nodes = [launch("multi_node.sh", {**env, "NODE_RANK": str(rank)},
                    ARGS + run_dirs(tmp_path, data) + ["--stop_at_step", "12"]) for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000012"
    finish(launch("single_node.sh", {"NPROC": "2"}, ARGS + run_dirs(tmp_path, data)))
    resumes = metrics(tmp_path / "log", "resume")
    assert [(r["step"], r["world_size_saved"], r["world_size"]) for r in resumes] == [(12, 2, 2)]
    assert_same_committed_run(tmp_path, reference, tmp_path)


def test_plot_marks_checkpoints_and_resume(elastic_run, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from dcp_train.tools.plot import main, plot_metrics

    records = metrics(elastic_run / "log")
    fig = plot_metrics(records, str(tmp_path / "loss.png"), size=(8, 4), dpi=50)
    lines = {}
    for line in fig.axes[0].get_lines():
        lines.setdefault(line.get_gid(), []).append(list(line.get_xdata()))
    resume_step = next(r["step"] for r in of_kind(records, "resume"))
    assert len(lines["train"]) == 2  # before the kill, after the restart
    assert lines["train"][0][0] == 1 and lines["train"][1] == list(range(resume_step + 1, 25))
    assert lines["val"] == [[8, 16, 24]]
    committed = sorted({r["step"] for r in of_kind(records, "checkpoint")})
    assert [x[0] for x in lines["checkpoint"]] == committed and committed[-4:] == [12, 16, 20, 24]
    assert [x[0] for x in lines["resume"]] == [resume_step]
    assert matplotlib.image.imread(tmp_path / "loss.png").shape[:2] == (200, 400)

    assert main([str(elastic_run / "log"), "-o", str(tmp_path / "cli.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "cli.png").shape[:2] == (500, 1000)


def test_slurm_script_contract():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")], check=True)
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1',
                 "--rdzv_backend=c10d", "-m dcp_train.main --auto_resume \"$@\"",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text, line
    for script in ("single_node.sh", "multi_node.sh", "elastic.sh"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)
