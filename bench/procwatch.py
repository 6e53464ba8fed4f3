"""Run a training command and timestamp its step lines with wall clock and CPU time.

Both our trainer and bench/plain_loop.py print one line per optimizer step, starting
`step <N> | loss`. While the child runs we read its stdout line by line; at each step line we
note time.perf_counter() and the CPU seconds (user + system, all threads) used so far by the
processes doing the work: the child and its descendants, without a `torchrun` agent at the
top (that one only babysits its worker). A segment of steps is then timed from one step line
to another: wall clock includes everything the loop did in between (data, logging, a save that
blocked it), and CPU time is the work, much less disturbed by other jobs on a shared machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from bench.common import REPO, ChildFailed, child_env, failure_text, threads_per_rank

STEP_LINE = re.compile(r"^step\s+(\d+) \| loss")
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime + stime in seconds) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(root: int, skip_root: bool) -> float:
    """CPU seconds of `root`'s descendants (and of root itself unless skip_root)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                cpu[int(name)] = st[1]
    total, todo = 0.0 if skip_root else cpu.get(root, 0.0), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def run_watched(cmd: list[str], nproc: int, timeout: float, skip_root: bool,
                env: dict | None = None, log=None) -> dict[int, tuple[float, float]]:
    """Run `cmd` from the repo root; return {step: (wall seconds, CPU seconds)} at its lines."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env, threads_per_rank(nproc)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    marks: dict[int, tuple[float, float]] = {}
    tail: list[str] = []
    try:
        for line in proc.stdout:
            m = STEP_LINE.match(line)
            if m:
                marks[int(m.group(1))] = (time.perf_counter(), tree_cpu(proc.pid, skip_root))
            tail.append(line)
            if time.perf_counter() - t0 > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
        rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if log is not None:
        log(f"    ({time.perf_counter() - t0:.1f}s) {' '.join(cmd[-12:])[:160]}")
    if rc != 0:
        raise ChildFailed(failure_text(cmd, rc, "".join(tail)))
    return marks
