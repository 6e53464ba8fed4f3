"""One failure, one line: how a rank leaves the job when something went wrong.

Contract (docs/errors.md):

- The rank that holds the root cause (`origin`) prints `dcp_train: error: <what>; <what to
  do>` on stderr, once, and writes the same text (without the prefix) to its torch elastic
  error file (`TORCHELASTIC_ERROR_FILE`, torch's `ErrorHandler` JSON format), so that
  torchrun's `Root Cause` section shows it instead of `error_file: <N/A>`. An error every rank
  sees alike (a bad flag, a choice rank 0 made for all through `distributed.agree`) has rank
  0 as its origin; an error one rank raised inside `agree` has that rank as its origin (the
  exception's `origin_rank`); an error ranks raise on their own has as its origin the lowest
  rank that posts the same words in the rendezvous store within ALIKE_WAIT_S.
- Every other rank is quiet: it prints nothing and exits with the same code. Under torchrun,
  with the origin on the same node, it first waits (at most QUIET_WAIT_S) for the agent to
  notice the origin's exit and to stop it with SIGTERM, and only then writes its own error
  file ("stopped because rank R failed"). torch elastic takes the failure with the earliest
  timestamp as the root cause, and on a tie the one it noticed first: the origin is noticed
  first, so it is named as the root cause on every machine speed.
- A rank or a save process that stopped answering (SIGSTOP, a hang) is named by run/stall.py
  through `leave` (heartbeats, --stall_timeout).
- A rank whose peer died (a gloo transport error: "Connection closed by peer ...") names the
  peer: "rank 1 died (signal 9) during the save of step 10". If that peer left through this
  module (its failure is registered in the rendezvous store) the survivor is quiet instead and
  takes the peer's exit code. Otherwise one survivor (the lowest reporting it) prints the
  line and exits with
  EXIT_PEER_LOST after the agent has noticed the dead peer, which torchrun then names as the
  root cause with its signal. The signal is named when it can still be read (the dead process
  is a zombie on this host); otherwise the line says the process is gone.

Everything here ends the process with os._exit (no interpreter shutdown while gloo's threads
may still run, see main.py). Imports torch only when a process group exists.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from dcp_train.errors import EXIT_PEER_LOST, chain, error_line, scrub_line

QUIET_WAIT_S = 30.0  # torchrun's own grace period before it SIGKILLs a worker
ALIKE_WAIT_S = 5.0  # how long a rank waits for a lower rank to report the same failure
_TRANSPORT_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "gloo/transport", "Socket Timeout", "connection refused")
_activity = ["the start"]  # what this rank is doing, for the words about a dead peer
_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, after record_peers()
_stop_came: list[int] = []  # a SIGTERM/SIGINT arrived while leaving or held (_catch_stop)


def this_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def set_activity(text: str) -> None:
    """What this rank is doing now ("the save of step 10"), named if a peer dies meanwhile."""
    _activity[0] = text


def activity() -> str:
    return _activity[0]


def peers() -> list[tuple[str, int]]:
    """(host, pid) of every rank (after record_peers), else []."""
    return list(_peers)


def write_error_file(message: str, code: int) -> None:
    """This rank's torch elastic error file (nothing when not under torchrun): torch's
    ErrorHandler format without a traceback, so torchrun's report shows `message`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": scrub_line(message), "errorCode": code,
                        "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the report then says <N/A>; the line on stderr stands


def leave(message: str, code: int, origin: int | None = None, before_exit=None,
          silent=()) -> None:
    """End this rank for a failure whose root cause is rank `origin` (default: the lowest
    rank reporting the same `message`, unless a peer has already left through here: then
    that peer's line is the job's and this rank leaves quietly with its code): the origin
    prints `message`, records it, runs `before_exit()` (stall.py: kill a stalled process)
    and exits; the others leave quietly (module docstring). `silent`: ranks known not to
    answer (stall.py), not waited for. Never returns."""
    _catch_stop()
    rank = this_rank()
    if origin is None:
        quiet_if_peer_left()
        origin = _first_alike(message, rank, silent)
    if origin == rank:
        _say_and_exit(message, code, before_exit)
    _after_agent(origin, lambda: _quiet_exit(origin, code))


def quiet_if_peer_left() -> None:
    """If a peer has left through leave() (registered in the store), leave quietly with its
    code (never returns); else return."""
    failed = _registered_failures()
    if failed:
        _catch_stop()
        origin, code = min(failed.items())
        _after_agent(origin, lambda: _quiet_exit(origin, code))


def _say_and_exit(message: str, code: int, before_exit=None) -> None:
    error_line(message)
    write_error_file(message, code)
    _register(this_rank(), code)
    if before_exit is not None:
        before_exit()
    _wait_for_local_ranks()
    _exit(code)


def _wait_for_local_ranks(wait_s: float = 5.0) -> None:
    """Under torchrun on Linux: before this rank's exit makes the agent stop the others, wait
    (at most `wait_s`) until every other worker of the agent catches SIGTERM (SigCgt in
    /proc: it has reached dcp_train's main, hold_stop) or has ended, so that each leaves
    quietly with the same code instead of dying by the signal while still starting up."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.path.isdir("/proc"):
        return
    agent, me = os.getppid(), os.getpid()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if all(_catches_sigterm_or_ended(pid, agent) for pid in _children(agent) if pid != me):
            return
        time.sleep(0.02)


def _children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _catches_sigterm_or_ended(pid: int, agent: int) -> bool:
    """A started worker (its command line is no longer the agent's: it was forked, then
    exec'd) that catches SIGTERM, or a process that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f, open(f"/proc/{agent}/cmdline", "rb") as g:
            exec_done = f.read() != g.read()
    except OSError:
        return True
    if status.get("State", "").strip().startswith(("Z", "X")):
        return True
    return exec_done and bool(int(status.get("SigCgt", "0").strip(), 16) >> (signal.SIGTERM - 1) & 1)


def _quiet_exit(origin: int, code: int) -> None:
    write_error_file(f"stopped because rank {origin} failed (exit {code}); see its line", code)
    _exit(code)


def _catch_stop() -> dict:
    """From here on the agent's SIGTERM (or a SIGINT) only marks that it came: this rank is
    leaving anyway, and says what it has to say first (no preemption save, no death by
    the default handler). Returns the handlers it replaced."""
    def stopped(signum, _frame):
        _stop_came.append(signum)
    return {sig: signal.signal(sig, stopped) for sig in (signal.SIGTERM, signal.SIGINT)}


def hold_stop() -> dict:
    """While the flags are checked: a SIGTERM/SIGINT waits (torchrun stops the other ranks as
    soon as rank 0 has said a bad flag, maybe before they reached the same check; they then
    leave quietly with the same code). release_stop(returned) ends the hold."""
    return _catch_stop()


def release_stop(previous: dict) -> None:
    """The handlers before hold_stop() again; a signal that came meanwhile acts now."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if _stop_came:
        signal.raise_signal(_stop_came.pop())


def _after_agent(origin: int, then) -> None:
    """Call `then` (which ends the process) now; or, under torchrun with rank `origin` on
    this node, once the agent has noticed origin's exit (at most QUIET_WAIT_S later): when
    origin's process is reaped (its pid is known after record_peers), or when the agent
    stops this rank with SIGTERM. The agent then reports `origin` as the first failure."""
    if _same_node_under_torchrun(origin) and not _stop_came:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: then())
        pid = _peers[origin][1] if origin < len(_peers) and os.path.isdir("/proc") else None
        deadline = time.monotonic() + QUIET_WAIT_S
        while not _stop_came and time.monotonic() < deadline:
            if pid is not None and not os.path.exists(f"/proc/{pid}"):
                break  # reaped: the agent has it (SIGTERM may have come before our handler)
            time.sleep(0.02)
    then()


def _same_node_under_torchrun(origin: int) -> bool:
    if "TORCHELASTIC_RUN_ID" not in os.environ or origin < 0:
        return False
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return per_node > 0 and origin // per_node == this_rank() // per_node


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------ a peer that died
def record_peers() -> None:
    """Learn (host, pid) of every rank (one all_gather at setup), to name a dead peer."""
    import socket

    import torch.distributed as dist
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _peers[:] = peers


def is_transport_error(exc: BaseException) -> bool:
    """A collective failed because a peer's connection went away (gloo's words)."""
    return any(t.lower() in str(e).lower() for e in chain(exc) for t in _TRANSPORT_TEXT)


def leave_if_peer_lost(exc: BaseException) -> None:
    """For an unexpected exception: if it is a transport error, name the dead peer (module
    docstring) and leave; otherwise return (the caller re-raises)."""
    if not _peers or not is_transport_error(exc):
        return
    _catch_stop()
    rank = this_rank()
    quiet_if_peer_left()  # a peer left through leave(): its line is the job's line
    dead = _dead_peers(rank)
    what = (", ".join(f"rank {r} died ({how})" for r, how in dead) if dead else
            "a peer rank stopped answering (on another host, or it is already gone)")
    message = (f"{what} during {_activity[0]}; the last committed checkpoint is intact, "
               f"relaunch with --auto_resume (exit {EXIT_PEER_LOST})")
    speaker = _first_alike(message, rank)  # one survivor says it
    dead_rank = dead[0][0] if dead else -1
    if speaker != rank:
        _after_agent(dead_rank, lambda: _quiet_exit(speaker, EXIT_PEER_LOST))
    _after_agent(dead_rank, lambda: _say_and_exit(message, EXIT_PEER_LOST))


def _dead_peers(rank: int, wait_s: float = 2.0) -> list[tuple[int, str]]:
    """(rank, how it ended) of the peers on this host whose process is gone or a zombie;
    polled for up to `wait_s`, since a peer's sockets close while it is still exiting."""
    import socket
    host = socket.gethostname()
    local = [(r, pid) for r, (h, pid) in enumerate(_peers) if r != rank and h == host]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(r, how) for r, pid in local if (how := _how_it_ended(pid))]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.002)


def _how_it_ended(pid: int) -> str | None:
    """'signal 9' / 'exit 3' for a zombie, 'its process is gone' for a reaped one, None for a
    live one. Field 52 of /proc/PID/stat is the waitpid(2) status of an exited process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return "its process is gone"
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0
    return f"signal {status & 0x7F}" if status & 0x7F else f"exit {status >> 8}"


def rendezvous_store():
    """The rendezvous store of the process group, or None (stall.py's heartbeats)."""
    return _store()


def store_key(kind: str, rank: int) -> str:
    return _key(kind, rank)


def _store():
    """The rendezvous store of the process group, or None (none initialised: torch is then
    not imported here at all, so a flag error leaves at once)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # no store, or one that left with rank 0
        return None
    return None


def _key(kind: str, rank: int) -> str:
    """A key in the process group's store, which is this attempt's own (torchrun restarts keep
    the store underneath: distributed.attempt_store gives each attempt a prefix of its own)."""
    return f"dcp_train/{kind}/{rank}"


def _first_alike(message: str, rank: int, silent=()) -> int:
    """For a failure raised outside `agree`: the lowest rank that reports the same message
    (this one if none does within ALIKE_WAIT_S). Each such rank posts its message in the
    rendezvous store; rank 0 never waits. A failure only this rank has costs it the wait,
    while the other ranks wait for it in a collective anyway."""
    store = _store()
    if store is None:
        return rank
    try:
        store.set(_key("error", rank), message)
        lower = [r for r in range(rank) if r not in silent]
        if not lower:
            return rank
        deadline = time.monotonic() + ALIKE_WAIT_S
        while time.monotonic() < deadline:
            for r in lower:
                key = _key("error", r)
                if store.check([key]) and store.get(key).decode() == message:
                    return r
            time.sleep(0.05)
    except Exception:  # the store is gone (it lived with rank 0): say it here
        pass
    return rank


def _register(rank: int, code: int) -> None:
    """Tell the surviving ranks that this rank leaves on purpose, with `code` (and ranks that
    failed alike, that this one says it)."""
    store = _store()
    if store is not None:
        try:
            store.set(_key("failed", rank), str(code))
        except Exception:
            pass


def _registered_failures() -> dict[int, int]:
    store = _store()
    found = {}
    if store is None:
        return found
    for r in range(len(_peers)):
        key = _key("failed", r)
        try:
            if store.check([key]):
                found[r] = int(store.get(key))
        except Exception:
            return found
    return found
