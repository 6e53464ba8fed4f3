"""The tools' inputs and outputs, checked before any work (docs/errors.md, "The tools").

Every tool (`dcp-ckpt ls/inspect/verify/export`, `python -m dcp_train.plot`, `sample`,
`hellaswag`) checks the local paths it is given before it reads a byte: an input that is missing
or of the wrong kind (a file where a dir is expected, or the reverse), an output whose parent
dir is missing or not a dir, an output that is a dir where a file is written, and an output
that already exists where the tool does not replace one. Each is one PathError line (exit 2),
naming the path and what to give instead; nothing has been read or written by then.

URLs (s3://, gs://, ...) are left to their stores, which say what is wrong when read.
"""

from __future__ import annotations

import os
from typing import Optional


class PathError(Exception):
    """A path of the wrong kind: one line, exit code 2."""


def local(path: str) -> Optional[str]:
    """The local path of `path` (file:// stripped), or None for a URL of another store."""
    path = str(path)
    if path.startswith("file://"):
        return path.removeprefix("file://")
    return None if "://" in path else path


def input_dir(path: str, what: str, give: str) -> None:
    """`path` (flag or argument `what`) must be an existing dir; give: what to give instead."""
    existing(path, what, give, "dir")


def input_file(path: str, what: str, give: str) -> None:
    """`path` must be an existing file (not a dir)."""
    existing(path, what, give, "file")


def existing(path: str, what: str, give: str, kind: str) -> None:
    p = local(path)
    if p is None:
        return
    if not os.path.exists(p):
        raise PathError(f"{what} {path} does not exist; give {give}")
    if kind == "dir" and not os.path.isdir(p):
        raise PathError(f"{what} {path} is a file, not a directory; give {give}")
    if kind == "file" and os.path.isdir(p):
        raise PathError(f"{what} {path} is a directory, not a file; give {give}")


def output_file(path: str, what: str, replace: bool, dir_hint: str = "") -> None:
    """A file the tool will write at `path`: not a dir, in an existing dir, and (unless
    `replace`) not there yet. dir_hint: what to do when `path` is a dir."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise PathError(f"{what} {path} is a directory; give a file path"
                        + (f", {dir_hint}" if dir_hint else ""))
    if os.path.exists(p) and not replace:
        raise PathError(f"{what} {path} already exists; remove it or give another path")
    output_parent(p, what, path)


def output_dir(path: str, what: str) -> None:
    """A dir the tool will create (or write into) at `path`: not a file, in an existing dir."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise PathError(f"{what} {path} is a file, not a directory; give a directory")
    output_parent(p, what, path)


def output_parent(p: str, what: str, path: str) -> None:
    parent = os.path.dirname(p)
    if not os.path.exists(parent):
        raise PathError(f"{what} {path}: its directory {parent} does not exist; create it "
                        "first or give another path")
    if not os.path.isdir(parent):
        raise PathError(f"{what} {path}: {parent} is a file, not a directory; give another "
                        "path")
