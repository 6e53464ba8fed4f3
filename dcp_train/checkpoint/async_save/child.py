"""The save process itself (the child side of save_process.py), started with `spawn`.

`serve` joins a gloo group of the save processes only, then runs the synchronous save protocol
(protocol.Checkpointer.write_and_commit) on every staged state the training process sends
through the pipe, and sends back the `checkpoint` record or the CheckpointError. It dies with
its training process and ignores SIGINT, SIGTERM and SIGUSR1 (see save_process.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import torch.distributed as dist

from dcp_train.checkpoint.async_save.state_pipe import Decoder
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.errors import CheckpointError, one_line
from dcp_train.run import faults
from dcp_train.run.metrics import resident_mb


def serve(root, storage_options, verify, keep_last_n, rank, world_size, host, port,
          parent, conn) -> None:
    _die_with(parent)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    faults.kill_parent_too()

    store = dist.TCPStore(host, port, world_size + 1, is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("save", store), rank=rank,
                            world_size=world_size)
    checkpointer = Checkpointer(CheckpointDir(root, storage_options, verify=verify),
                                keep_last_n)
    decoder = Decoder()
    while (request := conn.recv()) is not None:
        step, t0, staged = request
        try:
            staged = decoder.decode(staged)
            record = checkpointer.write_and_commit(step, staged, rank, t0)
            record["save_process_rss_mb"] = resident_mb()
        except CheckpointError as e:
            record = e
        except Exception as e:
            record = CheckpointError(f"saving step {step} failed: {one_line(e)}")
        del staged
        conn.send(record)
    dist.destroy_process_group()


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
