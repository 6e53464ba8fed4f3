"""Progress bars (tqdm) on the long waits, for a person at a terminal only.

    for example in bar(examples, desc="HellaSwag", rank=rank): ...
    with received_bytes("resume: download", total=n_bytes, rank=rank): fs.cat(paths)

A bar shows only on rank 0 and only when stderr is an interactive terminal (tqdm's
`disable=None`): in a log file, a pipe, under a batch system or on any other rank it writes
nothing at all, so logs stay clean. `DCP_TRAIN_PROGRESS=0` turns bars off at a terminal too.
Bars are transient (`leave=False`): the console lines the trainer prints stay as they were.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

from tqdm import tqdm

OFF = "DCP_TRAIN_PROGRESS"


def bar(iterable=None, *, desc: str, total: float | None = None, unit: str = "it",
        rank: int = 0, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm on stderr that is silent unless `enabled`, rank 0 and at a terminal (see the
    module doc)."""
    off = not enabled or rank != 0 or os.environ.get(OFF, "1") == "0"
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr,
                disable=True if off else None, leave=False, dynamic_ncols=True, **kwargs)


def _rchar() -> int | None:
    """Bytes this process has read so far through read syscalls (sockets included), from
    /proc/self/io; None where that is not available."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


@contextmanager
def received_bytes(desc: str, total: int, rank: int = 0, interval: float = 0.2):
    """A bytes bar for a download that offers no callback (fsspec's concurrent `cat`): a
    thread polls the bytes the process has received meanwhile (/proc/self/io), so the count
    is approximate (protocol overhead included) and capped at `total`."""
    progress = bar(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   rank=rank)
    start = _rchar()
    if progress.disable or start is None or total <= 0:
        progress.close()
        yield
        return
    done = threading.Event()

    def poll() -> None:
        while not done.wait(interval):
            count()

    def count() -> None:
        progress.update(max(0, min(total, _rchar() - start) - progress.n))

    watcher = threading.Thread(target=poll, name="dcp_train-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        count()
        progress.refresh()  # the final count, whatever tqdm's display interval skipped
        progress.close()
