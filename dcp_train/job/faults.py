"""Test-only fault injection: SIGKILL a chosen rank at a named point of the save protocol.

Off unless the environment variable DCP_TRAIN_FAULT is set, as
`POINT[:RANK[:STEP[:pause|stop|sigint]]]` (RANK and STEP default to any). With `pause` the
process stops at the point instead (sleeps until something kills it): for tests that deliver the
SIGKILL from outside at a known point. With `stop` it sends itself SIGSTOP there, every thread
frozen as on a hung node (tests/test_stalls.py). With `sigint` it sends itself SIGINT and goes
on: a Ctrl-C arriving at that point (tests/test_signals.py). The process kills itself with SIGKILL, exactly like an OOM
killer or a lost node would: no cleanup, no flushing. Points, in protocol order:

    mid_shard            this rank has written part of one of its DCP files (dcp_io.py)
    after_shards         this rank's DCP shard files are written (before the manifest)
    before_commit        rank 0: manifest written into the temp dir, not yet renamed (local);
                         every file but the manifest written into the step dir (object store)
    after_commit         rank 0: step dir committed, `latest` not yet updated
    mid_latest           rank 0: `latest`'s temporary file written, not yet in place
    during_retention     rank 0: retention has deleted its first directory
    mid_removal          rank 0: a dir being deleted has lost its manifest.json, not yet its
                         other files (retention, or a step dir written over)
    mid_step             this rank starts training step STEP (train/loop.py)
    mid_replication      this rank has uploaded its files of a local checkpoint to the durable
                         tier, which has no manifest.json for it yet (replicate.py)

The save protocol calls `at_step(step)` when a save starts, so points reached from code that
knows no step (atomic.write_atomic's `mid_<file name>`, dcp_io's `mid_shard`) match STEP too,
and a point reached without a rank takes this process's rank in torch.distributed.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

POINTS = ("mid_shard", "after_shards", "before_commit", "after_commit", "mid_latest",
          "during_retention", "mid_removal")
TIER_POINTS = ("mid_replication",)  # with --local_checkpoint_dir only (tests/test_tiers.py)
TRAIN_POINTS = ("mid_step",)


_current_step: int | None = None
_kill_parent = False


def kill_parent_too() -> None:
    """In a save process (save_process.py): a fault kills its training process as well, so
    the rank dies as it would with the save in-process."""
    global _kill_parent
    _kill_parent = True


def armed() -> bool:
    """Whether a fault is set for this process: code that would reach a point thousands of
    times per save (dcp_io's `mid_shard`, at every write) asks once instead."""
    return bool(os.environ.get("DCP_TRAIN_FAULT"))


def at_step(step: int) -> None:
    """The step of the save in progress (one save at a time)."""
    global _current_step
    _current_step = step


def fault_point(point: str, rank: int | None = None, step: int | None = None) -> None:
    spec = os.environ.get("DCP_TRAIN_FAULT")
    if not spec:
        return
    step = _current_step if step is None else step
    if rank is None and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    name, want_rank, want_step, action = (spec.split(":") + ["", "", ""])[:4]
    if name not in POINTS + TIER_POINTS + TRAIN_POINTS:
        raise ValueError(f"DCP_TRAIN_FAULT names unknown point {name!r}; one of "
                         f"{POINTS + TIER_POINTS + TRAIN_POINTS}")
    if name != point:
        return
    if want_rank and rank is not None and int(want_rank) != rank:
        return
    if want_step and step is not None and int(want_step) != step:
        return
    if action == "pause":
        time.sleep(3600)
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
        return
    if _kill_parent:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
