"""The documents `python -m dcp_train.data.prepare` tokenizes: the sources default, text and
fineweb (their contracts are in prepare.py's docstring). Each yields one string a document."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Iterator

from .shards import DataError


def stdlib_files() -> list[str]:
    """The default corpus's files: the stdlib's *.py, sorted by relative path (module doc)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found += [os.path.relpath(os.path.join(dirpath, n), root)
                  for n in filenames if n.endswith(".py")]
    if not found:
        raise DataError(f"no Python source found under the stdlib dir {root!r}; "
                        f"use --source text or fineweb")
    return [os.path.join(root, rel) for rel in sorted(found)]


def default_texts() -> Iterator[str]:
    for path in stdlib_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def text_texts(inputs: list[str]) -> Iterator[str]:
    """Documents of local files/globs in argument order (each glob sorted)."""
    if not inputs:
        raise DataError("--source text needs --inputs FILE_OR_GLOB ...")
    paths = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise DataError(f"--inputs {pattern!r} matches no file")
        paths += matches
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise DataError(f"{path}:{n} is not a JSON object with a 'text' "
                                            f"field") from None
            else:
                yield f.read()


def fineweb_texts(dataset_path: str, name: str, split: str) -> Iterator[str]:
    """The "text" column of FineWeb-Edu (hub, streamed) or of a local jsonl/parquet file."""
    try:
        import datasets
    except ImportError:
        raise DataError("--source fineweb needs the `datasets` library: pip install datasets")
    if os.path.exists(dataset_path):
        kind = "parquet" if dataset_path.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=dataset_path, split="train")
    else:
        ds = datasets.load_dataset(dataset_path, name=name, split=split, streaming=True)
    for row in ds:
        yield row["text"]
