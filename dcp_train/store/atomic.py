"""One atomic file write, for every file that must appear whole or not at all.

    write_atomic("/ckpt/latest", b"step_00000020\n")              # bytes
    write_atomic(path, lambda f: np.save(f, tokens))               # or a function that writes
    write_atomic("s3://bucket/run/latest", data, fs=s3_filesystem)  # an fsspec filesystem

Readers see the old content or the new, never a mix or nothing:
- local: a hidden temp file in the same directory (`.<name>.tmp-<8 hex>`), flushed and
  fsynced, then `os.replace` onto the name, then the directory fsynced (so the rename itself
  survives a power cut). A failure removes the temp file; a crash can leave one behind, and
  whoever owns the directory removes it (checkpoint retention does; `TEMP_RE` matches them).
- object store (any non-local fsspec filesystem): one PUT of the whole content, which replaces
  an object atomically.
"""

from __future__ import annotations

import io
import os
import re
import uuid
from typing import BinaryIO, Callable, Union

from dcp_train.job.faults import fault_point

Content = Union[bytes, Callable[[BinaryIO], None]]
TEMP_RE = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")


def write_atomic(path: str, content: Content, fs=None) -> None:
    """Write `content` (bytes, or a function writing to a binary file) to `path` atomically.
    `fs`: an fsspec filesystem for a non-local path; None or a local one: the local disk."""
    if fs is not None and not _is_local(fs):
        if callable(content):
            buf = io.BytesIO()
            content(buf)
            content = buf.getvalue()
        fault_point("mid_" + os.path.basename(path))
        fs.pipe_file(path, content)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        fault_point("mid_" + os.path.basename(path))  # test-only: see faults.py
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(d)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem
    return isinstance(fs, LocalFileSystem)
