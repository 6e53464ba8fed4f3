"""Child processes of the tests and the benchmarks (bench/common.py loads this file too): a
free port, the environment of a child, the torchrun command line, the processes below one.
Standard library only, so that a benchmark loads it without the test helpers' imports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken_cache"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None, threads: int = 1) -> dict:
    """Environment of a child: the repo importable, `threads` OpenMP threads per process, the
    shared tiktoken cache (no download), no inherited torchrun variables; `extra` on top."""
    env = dict(os.environ)
    if SHARED_TIKTOKEN.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    for name in TORCHRUN_VARS:
        env.pop(name, None)
    env.update(extra or {})
    return env


def torchrun(nproc: int, module_args: list[str]) -> list[str]:
    """The command line of torchrun on one node, `module_args` after its own (`-m module ...`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *module_args]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts each worker in a session of its own, so a
    process-group kill would miss them), children before theirs."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found
