"""The torch versions dcp_train supports, and the check that the private DCP parts it builds on
are there.

pyproject.toml declares `torch>=2.11,<2.14`: 2.11 is the lowest supported release, 2.13 the
highest tested. dcp_io.py and safe_metadata.py subclass and call private parts of
torch.distributed.checkpoint (the fsspec filesystem module, FileSystem.create_stream/rename,
FileSystemWriter's thread_count and write_data future, FileSystemReader._get_metadata_path and
load_id, the metadata classes by module path), which may change in any release. Both call
`require_dcp_internals()` when imported; it raises UnsupportedTorch, with one line that says
what to do, for a torch outside the range or one that lacks any of those parts.
DCP_TRAIN_ALLOW_UNTESTED_TORCH=1 accepts a newer torch than the highest tested one (the parts
are still checked): for trying a new release.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re

import torch

LOWEST = (2, 11)  # lowest supported (major, minor)
HIGHEST_TESTED = (2, 13)
ALLOW_UNTESTED = "DCP_TRAIN_ALLOW_UNTESTED_TORCH"
INSTALL_HINT = (f"install a torch in the supported range, e.g. pip install "
                f"'torch>={LOWEST[0]}.{LOWEST[1]},<{HIGHEST_TESTED[0]}.{HIGHEST_TESTED[1] + 1}'")

_CKPT = "torch.distributed.checkpoint"
# (module, attribute or None, names that must be parameters of it): what dcp_io.py and
# safe_metadata.py use
NEEDED = [
    (f"{_CKPT}._fsspec_filesystem", "FileSystem", ()),
    (f"{_CKPT}._fsspec_filesystem", "FsspecWriter", ("sync_files", "thread_count")),
    (f"{_CKPT}._fsspec_filesystem", "FsspecReader", ()),
    (f"{_CKPT}.filesystem", "FileSystem", ()),
    (f"{_CKPT}.filesystem", "FileSystem.create_stream", ("path", "mode")),
    (f"{_CKPT}.filesystem", "FileSystem.rename", ("path", "new_path")),
    (f"{_CKPT}._fsspec_filesystem", "FileSystem.init_path", ("path",)),
    (f"{_CKPT}.filesystem", "FileSystemWriter", ("path", "sync_files", "thread_count")),
    (f"{_CKPT}.filesystem", "FileSystemWriter.write_data", ("plan", "planner")),
    # dcp_io.py's remote writer replaces these two (`.metadata` under its final name)
    (f"{_CKPT}.filesystem", "FileSystemWriter.finish", ("metadata", "results")),
    (f"{_CKPT}.filesystem", "FileSystemWriter._metadata_exists", ()),
    (f"{_CKPT}.filesystem", "FileSystemWriter._get_metadata_path", ("rank",)),
    (f"{_CKPT}.filesystem", "CURRENT_DCP_VERSION", ()),
    (f"{_CKPT}.default_planner", "DefaultSavePlanner", ("dedup_save_to_lowest_rank",)),
    (f"{_CKPT}.filesystem", "FileSystemReader._get_metadata_path", ("rank",)),
    (f"{_CKPT}.filesystem", "_StorageInfo", ()),
    (f"{_CKPT}.metadata", "Metadata", ()),
    (f"{_CKPT}.metadata", "StorageMeta", ()),
    (f"{_CKPT}.metadata", "BytesStorageMetadata", ()),
    (f"{_CKPT}.metadata", "TensorStorageMetadata", ()),
    (f"{_CKPT}.metadata", "ChunkStorageMetadata", ()),
    (f"{_CKPT}.metadata", "TensorProperties", ()),
    (f"{_CKPT}.metadata", "MetadataIndex", ()),
    (f"{_CKPT}.planner", "LoadItemType", ()),
    (f"{_CKPT}.planner", "WriteItemType", ()),
    ("torch.serialization", "_get_layout", ()),
    # protocol.py's async save stages through these (pinned host memory on CUDA)
    (f"{_CKPT}.staging", "DefaultStager", ()),
    (f"{_CKPT}.staging", "StagingOptions", ("use_pinned_memory", "use_shared_memory",
                                            "use_async_staging", "use_non_blocking_copy")),
]


class UnsupportedTorch(RuntimeError):
    """This torch cannot run dcp_train; the message is one line that says what to do."""


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: '2.13.0+cpu', '2.14.0.dev20260901+cu128'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedTorch(f"cannot read the torch version {version!r}; {INSTALL_HINT}")
    return int(match.group(1)), int(match.group(2))


def range_problem(version: str, allow_untested: bool = False) -> str | None:
    """Why `version` is outside the supported range, or None if it is inside."""
    v = parse_version(version)
    if v < LOWEST:
        return (f"torch {version} is older than the lowest supported {LOWEST[0]}.{LOWEST[1]}; "
                f"{INSTALL_HINT}")
    if v > HIGHEST_TESTED and not allow_untested:
        return (f"torch {version} is newer than the highest tested "
                f"{HIGHEST_TESTED[0]}.{HIGHEST_TESTED[1]} (dcp_train builds on private DCP "
                f"classes that may have changed); {INSTALL_HINT}, or set {ALLOW_UNTESTED}=1 "
                f"to try it")
    return None


def missing_parts(needed=NEEDED) -> list[str]:
    """The entries of `needed` this torch lacks, as 'module.attr' (with missing parameters)."""
    missing = []
    for module_name, attr, params in needed:
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attr}")
            continue
        if params:
            have = inspect.signature(obj).parameters
            lacking = [p for p in params if p not in have]
            if lacking:
                missing.append(f"{module_name}.{attr}({', '.join(lacking)})")
    return missing


_checked = False


def require_dcp_internals() -> None:
    """Raise UnsupportedTorch unless this torch is in the range and has every part in NEEDED.
    Checked once per process."""
    global _checked
    if _checked:
        return
    problem = range_problem(torch.__version__, os.environ.get(ALLOW_UNTESTED) == "1")
    if problem is None:
        missing = missing_parts()
        if missing:
            problem = (f"torch {torch.__version__} lacks {', '.join(missing[:3])}, which "
                       f"dcp_train's checkpoint I/O builds on; {INSTALL_HINT}")
    if problem is not None:
        raise UnsupportedTorch(problem)
    _checked = True
