"""The GPU check's children: one at a time, each in a session of its own, its output in a log.

`Children(logs).run(cmd, log, timeout)` starts `cmd` (torchrun or python) from the repo root
with bench.common's child environment, appends its stdout and stderr to `logs/<log>.log` (a
header line names the command and, at the end, its exit code and seconds), waits at most
`timeout` seconds and returns its output. A child that fails raises ChildFailed with the root
cause and its tail; one that fails out of GPU memory raises ChildOOM (a ChildFailed).

`kill()` ends the child in flight and every process under it: the child is started with
`start_new_session=True`, so its process group is killed, and torchrun starts its workers in
sessions of their own, so every descendant found under /proc is killed too (collected before
anything is killed: an orphan is re-parented and could no longer be found). It runs when the
time box is spent and, from `run`, when anything interrupts the wait (the check's SIGTERM
handler raises there), so no child outlives the check on the GPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from bench.common import REPO, ChildFailed, child_env, descendants, failure_text

# The allocator setting every child runs with (the env part states it): expandable segments let
# the caching allocator grow blocks instead of fragmenting memory, which is what lets the 124M
# model's 64 x 1024 batch fit an H100's 78 GiB; a batch that still does not fit is halved
# (bench/gpu_parts.py, speed).
ALLOC_CONF = "expandable_segments:True"
# torch.OutOfMemoryError's text (CUDA caching allocator) and the CUDA runtime's own
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory")


class ChildOOM(ChildFailed):
    """The child ran out of (GPU) memory: a smaller batch may fit."""


class Children:
    def __init__(self, logs: Path, env: dict | None = None):
        self.logs, self.env = logs, dict(env or {})
        self.logs.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def run(self, cmd: list[str], log: str, timeout: float) -> str:
        path = self.logs / f"{log}.log"
        t0 = time.perf_counter()
        with open(path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            start = f.tell()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(self.env, 1), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                rc = f"killed after its {timeout:.0f} s (time box or the check's deadline)"
            except BaseException:  # SIGTERM of the check (raised by its handler), Ctrl-C
                self.kill()
                f.write(f"# killed: the check was stopped ({time.perf_counter() - t0:.1f} s)\n")
                raise
            finally:
                self.proc = None
            f.write(f"# exit {rc} after {time.perf_counter() - t0:.1f} s\n")
        with open(path) as f:
            f.seek(start)
            output = f.read()
        if rc != 0:
            text = failure_text(cmd, rc, output) + f"\n(the whole output: logs/{log}.log)"
            raise (ChildOOM if OOM.search(output) else ChildFailed)(text)
        return output

    def kill(self) -> None:
        """SIGKILL the child in flight, its process group and every process under it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        tree = descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


class CheckFailed(Exception):
    """A part ran, and what it checks does not hold (its figures say what)."""
