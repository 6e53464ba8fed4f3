"""Asynchronous saves off the training interpreter: one save process per rank.

What the training process does for an asynchronous save of step s (Checkpointer.save):
1. `submit`: takes references to the state (no copy) and copies the dict structure, so that
   nothing the next step changes in place (LR in the param groups, loader state) reaches the
   save. Returns at once.
2. Staging, on a background thread, overlapped with the next step's forward and backward:
   every tensor is copied into a staging buffer in shared memory (pinned too on CUDA, copied
   on a side stream; DCP's DefaultStager). The buffers are reused from save to save: at most
   one staged copy exists. Parameters and optimizer state change only in `optimizer.step()`,
   so the next `optimizer.step()` waits for the copy (`staged()`, an optimizer step pre-hook
   set by the manager); the training loop itself never waits for it.
3. The staged state goes to this rank's save process through a pipe (state_pipe.py: each
   buffer crosses once, as a shared-memory handle; later saves send references).

The save process runs the whole synchronous protocol of protocol.py on it (with a local tier,
tiers/local.py's save of it, which is the same protocol on the node-local dir; `build`): DCP planning and
serialization, checksums, writes and uploads, the space check, manifest, commit, `latest` and
retention, over a gloo group of the save processes only (rank 0 of the training hosts its
store). Python work in there competes for cores, not for the training interpreter's GIL.
It sends back the `checkpoint` record (its `seconds` run from the training process's request:
perf_counter is the system-wide monotonic clock on Linux), or the CheckpointError that every save process raised
(the protocol's failures are agreed on, distributed.agree).

Contracts:
- One save at a time: a new save first collects the previous one (Checkpointer.wait).
- Every rank starts its save process at its first asynchronous save (collective).
- A save process dies with its training process (PR_SET_PDEATHSIG on Linux, else a watch of
  its parent's pid every 0.1 s), so a killed rank never leaves a writer behind a relaunch; what
  it had not committed stays an uncommitted dir that discovery ignores and retention removes.
- It ignores SIGINT, SIGTERM and SIGUSR1: stopping is the training process's decision, and
  the stop waits for the save in flight.
- A fault point (faults.py) reached in a save process kills its training process too: a rank
  dies, as it would with the save in-process.
- A save process that died is a CheckpointError on every rank (agreed at the next poll).
- A save process that stopped answering (SIGSTOP, a hang) is found within --stall_timeout: it
  beats into shared memory every few seconds from a thread of its own (child.py); every wait
  for it here (each step's `done`, `result` at the next save and at the end) raises
  job/stall.SaveProcessStalled once no beat came for --stall_timeout (plus STARTUP_S before
  its first beat: spawning it imports torch). Its rank then kills it and the job ends with
  one line naming it (exit 69; stall.py). Its group with the other save processes has twice
  that timeout, so their owners do not give up on them first.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_train import distributed as D
from dcp_train.checkpoint.async_save.child import checkpointer, serve
from dcp_train.checkpoint.async_save.state_pipe import Encoder, pack
from dcp_train.errors import CheckpointError, one_line
from dcp_train.job import stall

STARTUP_S = 60.0  # allowed on top of --stall_timeout before a save process's first beat


class SaveProcess:
    """This rank's save process and its staging buffers (see the module docstring)."""

    def __init__(self, directory, keep_last_n: int, rank: int, world_size: int, build=None):
        """build: a picklable callable that builds, in the save process, the saver it runs
        (child.py); default: the save protocol over `directory`."""
        self.rank = rank
        if build is None:
            build = partial(checkpointer, directory.root, directory.storage.storage_options,
                            directory.verify, keep_last_n)
        self._store = None
        if rank == 0:  # the save processes' rendezvous; lives as long as this object
            self._store = dist.TCPStore("0.0.0.0", 0, world_size + 1, is_master=True,
                                        wait_for_workers=False)
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = D.agree(lambda: self._store.port)
        cuda = torch.cuda.is_available()
        self._stager = reusable_stager(cuda)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._timeout = stall.timeout()  # None outside a training job: no bound
        self._beat = ctx.Value("d", 0.0, lock=False)  # the child's time.monotonic() per beat
        self._started = time.monotonic()
        self._process = ctx.Process(
            target=serve, name=f"dcp_train-save-{rank}", daemon=True,
            args=(build, rank, world_size, host, port, os.getpid(), child, self._beat,
                  self._timeout))
        self._process.start()  # from the main thread: PR_SET_PDEATHSIG follows this thread
        child.close()
        self._pending: Optional[_Pending] = None
        self._encoder = Encoder()

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, step: int, state_dict: dict, t0: float, options: dict) -> None:
        """Start saving `state_dict` as step `step` (t0: when the save was asked for;
        options: keyword arguments of the saver's write_and_commit)."""
        pending = self._pending = _Pending(step, t0)
        staging = self._stager.stage(pack(state_dict))

        def send(future) -> None:  # on the staging thread, once the copy is done
            try:
                staged = future.result()
                pending.staged_s = time.perf_counter() - t0
                pending.copied.set()  # the live tensors may change from here on
                self._conn.send((step, t0, self._encoder.encode(staged), options))
            except BaseException as e:  # reported by result()
                pending.failure = e
            finally:
                pending.copied.set()
                pending.sent.set()

        staging.add_done_callback(send)
        pending.blocked_s = time.perf_counter() - t0

    def staged(self) -> None:
        """Block until the save in flight no longer needs the live tensors (before they
        change: the optimizer step)."""
        pending = self._pending
        if pending is not None and not pending.copied.is_set():
            t = time.perf_counter()
            pending.copied.wait()
            pending.blocked_s += time.perf_counter() - t

    def done(self) -> bool:
        """The save in flight has finished (committed or failed) on this rank."""
        pending = self._pending
        finished = pending is not None and pending.sent.is_set() and (
            pending.failure is not None or self._conn.poll() or not self._process.is_alive())
        if pending is not None and not finished:
            self._check_alive(pending.step)
        return finished

    def result(self) -> dict:
        """Wait for the save in flight; its `checkpoint` record, or its CheckpointError."""
        pending, self._pending = self._pending, None
        while not pending.sent.wait(0.5):
            self._check_alive(pending.step)
        while pending.failure is None and not self._conn.poll(0.5):
            if not self._process.is_alive():
                break  # its end of the pipe is closed: recv raises EOFError at once
            self._check_alive(pending.step)
        if pending.failure is not None:
            raise CheckpointError(f"staging step {pending.step} for saving failed: "
                                  f"{one_line(pending.failure)}")
        try:
            outcome = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise CheckpointError(
                f"the save process of rank {self.rank} died while saving step {pending.step} "
                f"(exit code {self._process.exitcode}); the step was not committed, the last "
                "committed checkpoint stays") from None
        if isinstance(outcome, BaseException):
            raise outcome
        outcome.update(blocked_s=pending.blocked_s, staged_s=pending.staged_s)
        outcome["async"] = True
        return outcome

    def _check_alive(self, step: int) -> None:
        """SaveProcessStalled if the save process gave no beat for --stall_timeout."""
        if self._timeout is None:
            return
        beat = self._beat.value
        silent = time.monotonic() - (beat if beat else self._started + STARTUP_S)
        if silent > self._timeout:
            raise stall.SaveProcessStalled(
                f"the save process of rank {self.rank} (pid {self._process.pid}) did not "
                f"answer for {self._timeout:g} s during the save of step {step} (stopped or "
                f"hung); step {step} was not committed, {stall.after_text()}",
                pid=self._process.pid, host=socket.gethostname())

    def close(self) -> None:
        """Stop the save process (after `result()` of the save in flight)."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=30)
        self._conn.close()
        close_stager(self._stager)


def reusable_stager(cuda: bool) -> DefaultStager:
    """DCP's DefaultStager as the module docstring describes it, usable for many saves.

    Some torch releases (2.11 among them) end every DefaultStager._stage with
    StateDictStager.close(), "to break a reference cycle": that drops the cached staging
    buffers (no reuse, a fresh pinned copy per save) and clears the stager's copy dispatch
    table, so the SECOND save fails while staging (`KeyError: <class 'type'>`, seen on CUDA
    with torch 2.11; any state dict with a dict in it reaches that branch). On such a
    release that per-save close is made a no-op on this instance; `close_stager` releases
    the buffers for real. The cycle it meant to break is collected by Python's GC."""
    stager = DefaultStager(StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=True,
        use_non_blocking_copy=cuda))
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None and hasattr(inner, "close"):
        inner.close = lambda: None  # instance attribute: DefaultStager._stage calls this one
    return stager


def close_stager(stager: DefaultStager) -> None:
    """Shut the stager's thread down and release its staging buffers (reusable_stager)."""
    stager.close()
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None and hasattr(type(inner), "close"):
        type(inner).close(inner)


class _Pending:
    def __init__(self, step: int, t0: float):
        self.step, self.t0 = step, t0
        self.copied, self.sent = threading.Event(), threading.Event()
        self.failure: Optional[BaseException] = None
        self.blocked_s = self.staged_s = 0.0
