"""The save process itself (the child side of save_process.py), started with `spawn`.

`serve` joins a gloo group of the save processes only, builds its saver there (`build()`: by
default `checkpointer`, the save protocol over the training's checkpoint dir; the local tier's
is tiers/local.py's `in_save_process`), then runs the synchronous save
(`saver.write_and_commit(step, state_dict, rank, t0, **options)`) on every staged state the
training process sends through the pipe, and sends back the `checkpoint` record or the
CheckpointError. It dies with its training process and ignores SIGINT, SIGTERM and SIGUSR1
(see save_process.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from dcp_train.checkpoint.async_save.state_pipe import Decoder
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.errors import CheckpointError, one_line
from dcp_train.job import faults, stall
from dcp_train.job.metrics import resident_mb


def checkpointer(root, storage_options, verify, keep_last_n) -> Checkpointer:
    """The default saver of a save process: the save protocol over the checkpoint dir."""
    return Checkpointer(CheckpointDir(root, storage_options, verify=verify), keep_last_n)


def serve(build, rank, world_size, host, port, parent, conn, beat=None,
          stall_timeout=None) -> None:
    """beat: a shared double this process sets to time.monotonic() every few seconds while it
    lives (a stopped process stops beating: save_process.py); stall_timeout: its group's
    timeout is twice that (None: torch's default)."""
    _die_with(parent)
    if beat is not None:
        _beat(beat, stall.beat_interval(stall_timeout or 30.0))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    faults.kill_parent_too()

    store = dist.TCPStore(host, port, world_size + 1, is_master=False)
    timeout = {} if stall_timeout is None else {"timeout": timedelta(seconds=2 * stall_timeout)}
    dist.init_process_group("gloo", store=dist.PrefixStore("save", store), rank=rank,
                            world_size=world_size, **timeout)
    saver = build()  # collective over the save processes' group (the local tier's setup)
    decoder = Decoder()
    while (request := conn.recv()) is not None:
        step, t0, staged, options = request
        try:
            staged = decoder.decode(staged)
            record = saver.write_and_commit(step, staged, rank, t0, **options)
            record["save_process_rss_mb"] = resident_mb()
        except CheckpointError as e:
            record = e
        except Exception as e:
            record = CheckpointError(f"saving step {step} failed: {one_line(e)}")
        del staged
        conn.send(record)
    dist.destroy_process_group()


def _beat(beat, interval: float) -> None:
    def run() -> None:
        while True:
            beat.value = time.monotonic()
            time.sleep(interval)

    threading.Thread(target=run, daemon=True, name="dcp_train-save-beat").start()


def _die_with(parent: int) -> None:
    """End this process when `parent` ends, however it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the watch below
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dcp_train-save-watch").start()
