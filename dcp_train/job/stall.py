"""Stalls: a rank or a save process that stops answering ends the job within --stall_timeout,
with one line naming it (exit EXIT_PEER_LOST, 69).

How a stall is found:

- Every collective has the process group's timeout, --stall_timeout (distributed.setup): the
  ranks waiting for a rank that stopped (SIGSTOP, a frozen node, a hung kernel) get gloo's
  timeout error (`distributed.timed_out`) after that long, whatever they were doing (a training
  step, the collectives of a save, the resume, the preemption save, the barrier at the end).
- Which rank stalled: every rank runs a heartbeat thread (`start`) that bumps a counter of its
  own in the rendezvous store every `beat_interval(stall_timeout)` seconds. A stopped process's
  threads stop too. A rank whose collective timed out reads every counter twice, 1.5 beats
  apart (`stopped_ranks`): the ranks whose counter did not move are the stalled ones. Counters,
  not timestamps: no clock of two hosts is ever compared.
- A save process (async_save/save_process.py) beats into shared memory; its training process
  waits at most --stall_timeout without a beat (every step's poll, the next save, the end) and
  raises `SaveProcessStalled`, which names it.

Then (`leave_if_stalled`, called by main for any exception a rank ends with): one rank says
the line, e.g. `rank 1 did not answer for 30 s during the save of step 6 (stopped or hung); the
last committed checkpoint is step 4: relaunch with --auto_resume`, through failure.leave (the
lowest rank that found the same stall says it, the others leave quietly with the same code).
Before it exits, the rank that says it SIGKILLs the stalled process if it is on this host (its
pid is known from failure.record_peers, or it is this rank's own save process): it is lost to
the job anyway, and a stopped worker would otherwise hold torchrun for its 30 s SIGTERM grace
period (a stopped process does not act on SIGTERM). A stalled rank on another host is left to
its own agent, which stops it once the job ends. A stall during a save never commits that
save: the commit (manifest, rename) comes after every rank's part is gathered, and the last
committed checkpoint stays as it is.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from dcp_train.errors import EXIT_PEER_LOST
from dcp_train.job import failure

_state = {"timeout": None, "committed": None}  # --stall_timeout once started; last commit


class SaveProcessStalled(RuntimeError):
    """A save process gave no sign of life for --stall_timeout seconds (save_process.py).
    `pid`/`host` name it; the rank that owns it kills it before leaving."""

    def __init__(self, message: str, pid: int = -1, host: str = ""):
        super().__init__(message)
        self.pid, self.host = pid, host

    def __reduce__(self):  # crosses ranks in distributed.agree
        return type(self), (str(self), self.pid, self.host)


def beat_interval(stall_timeout: float) -> float:
    """Seconds between two heartbeats: a tenth of the stall timeout, between 0.1 and 3 s."""
    return min(3.0, max(0.1, stall_timeout / 10))


def start(stall_timeout: float) -> None:
    """Start this rank's heartbeat thread (after the process group exists)."""
    _state["timeout"] = stall_timeout
    store = failure.rendezvous_store()
    if store is None:
        return
    interval = beat_interval(stall_timeout)

    def beat() -> None:
        count = 0
        while True:
            count += 1
            try:
                store.set(failure.store_key("beat", failure.this_rank()), str(count))
            except Exception:
                pass  # the store left with the job; this process is ending
            time.sleep(interval)

    threading.Thread(target=beat, daemon=True, name="dcp_train-heartbeat").start()


def timeout() -> float | None:
    """--stall_timeout, once `start` ran in this process (None before)."""
    return _state["timeout"]


def committed(step: int | None) -> None:
    """The newest step committed so far (named in the line about a stall)."""
    if step is not None and (_state["committed"] is None or step > _state["committed"]):
        _state["committed"] = step


def stopped_ranks(world_size: int) -> list[int] | None:
    """The other ranks whose heartbeat did not move in 1.5 beats; None if the store cannot be
    read."""
    store, me = failure.rendezvous_store(), failure.this_rank()
    if store is None or _state["timeout"] is None:
        return None
    keys = [failure.store_key("beat", r) for r in range(world_size)]

    def counters() -> list[bytes | None]:
        return [store.get(k) if store.check([k]) else None for k in keys]

    try:
        before = counters()
        time.sleep(1.5 * beat_interval(_state["timeout"]))
        after = counters()
    except Exception:
        return None
    return [r for r in range(world_size) if r != me and (after[r] is None or after[r] == before[r])]


def leave_if_stalled(exc: BaseException) -> None:
    """For the exception a rank ends with: a save process that stalled, or a collective that
    timed out, ends the job with one line (module docstring) and never returns; anything else
    returns (the caller goes on)."""
    from dcp_train import distributed as D

    if isinstance(exc, SaveProcessStalled):
        origin = getattr(exc, "origin_rank", None)
        origin = failure.this_rank() if origin is None else origin
        failure.leave(str(exc), EXIT_PEER_LOST, origin=origin,
                      before_exit=lambda: _kill(exc.pid, exc.host))
    if _state["timeout"] is None or not D.timed_out(exc):
        return
    failure.quiet_if_peer_left()  # a peer already said the job's line
    world_size = len(failure.peers()) or int(os.environ.get("WORLD_SIZE", "1"))
    stalled = stopped_ranks(world_size)
    message = stall_line(stalled)
    failure.leave(message, EXIT_PEER_LOST, silent=stalled or (),
                  before_exit=lambda: [_kill(*_pid_host(r)) for r in stalled or []])


def stall_line(stalled: list[int] | None) -> str:
    """The line for a collective that timed out, naming the stalled ranks if known."""
    seconds, during, after = f"{_state['timeout']:g} s", failure.activity(), after_text()
    if stalled:
        who = ", ".join(f"rank {r}" for r in stalled)
        return (f"{who} did not answer for {seconds} during {during} (stopped or hung); "
                f"{after} (exit {EXIT_PEER_LOST})")
    return (f"a collective did not complete within {seconds} during {during} although every "
            f"rank's heartbeat is alive (a hang inside a rank, or the network); {after} "
            f"(exit {EXIT_PEER_LOST})")


def after_text() -> str:
    """What is left and what to do, for a line about a stall."""
    step = _state["committed"]
    if step is None:
        return "no checkpoint was committed yet: relaunch to start again"
    return f"the last committed checkpoint is step {step}: relaunch with --auto_resume"


def _pid_host(rank: int) -> tuple[int, str]:
    peers = failure.peers()
    return (peers[rank][1], peers[rank][0]) if rank < len(peers) else (-1, "")


def _kill(pid: int, host: str) -> None:
    """SIGKILL a stalled process of this host (module docstring); others are left alone."""
    if pid > 0 and host == socket.gethostname() and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
