"""Ranks die with their agent: a rank whose torchrun process is gone exits within a second.

torchrun starts every worker in a session of its own, so when the torchrun process itself is
killed (`kill -9 <torchrun pid>`, an OOM kill of the agent) nothing reaches the workers: they
would keep training and committing, and hold the writer lease against a relaunch.

`watch_parent()` starts a daemon thread that polls `os.getppid()` (portable: no Linux-only
prctl(PR_SET_PDEATHSIG)). When the parent changes (this process was re-parented to init or a
subreaper), the agent is dead: the thread prints one line and ends the process with
`os._exit(EXIT_ORPHANED)`, at whatever point the training is. Nothing half-done is ever
committed by that: a step dir counts as committed only once its manifest is inside and it has
its final name (an atomic rename locally, the manifest PUT last on object stores), and
`latest` is replaced atomically only after the commit. A save cut short leaves a temp or
uncommitted dir that discovery ignores and retention removes; `latest` keeps naming the last
committed checkpoint, from which `--auto_resume` continues. The writer lease names this
process's pid, so on the same host a relaunch sees it dead and takes the lease over.

Only under torchrun (TORCHELASTIC_RUN_ID is set), where the parent is the agent. A plain
`python -m dcp_train.main` keeps running when its shell goes away (nohup style).
"""

from __future__ import annotations

import os
import threading
import time

from dcp_train.errors import EXIT_ORPHANED

POLL_S = 0.5
_parent: int | None = None  # the agent's pid, while watched


def watch_parent(interval_s: float = POLL_S, environ=None) -> threading.Thread | None:
    """Start the watch (see the module docstring); the thread, or None when not under torchrun
    or already orphaned at start (parent pid 1: nothing left to watch)."""
    environ = os.environ if environ is None else environ
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" not in environ or parent == 1:
        return None
    global _parent
    _parent = parent
    thread = threading.Thread(target=_watch, args=(parent, interval_s), daemon=True,
                              name="dcp_train-parent-watch")
    thread.start()
    return thread


def exit_if_orphaned() -> None:
    """Leave as the watch would, if the agent is gone. For an error in the training: a rank
    whose collective failed because another rank already left with the agent says why it
    stops, instead of a gloo traceback."""
    if _parent is not None and os.getppid() != _parent:
        _leave(_parent)


def _watch(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    _leave(parent)


def _leave(parent: int) -> None:
    try:
        os.write(2, f"dcp_train: the torchrun agent (pid {parent}) is gone: rank pid "
                    f"{os.getpid()} exits without a checkpoint; relaunch with --auto_resume "
                    f"(exit code {EXIT_ORPHANED})\n".encode())
    except OSError:  # stderr was the dead agent's pipe
        pass
    os._exit(EXIT_ORPHANED)
