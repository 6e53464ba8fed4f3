"""Reading DCP checkpoints without running code from them.

DCP stores `.metadata` as a pickle and reads it with `pickle.load`; it reads byte entries with
`torch.load` with weights_only off. A checkpoint from a bucket that someone else can write to
could therefore run arbitrary code on load. Our readers (see dcp_io.py) instead:

- unpickle `.metadata` with `RestrictedUnpickler`, which resolves only an allow-list of the
  classes DCP's metadata is made of (plus torch dtypes/Size/layouts and pathlib paths) and
  refuses every other global: `os.system`, `builtins.open`, `subprocess.*`... never get called;
- refuse checkpoints that contain byte entries (BytesStorageMetadata): we never write them
  (state.py stores non-tensor state as JSON in uint8 tensors), so one is a sign of a foreign
  or tampered checkpoint; tensors themselves are read by DCP with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle

import torch

from dcp_train.torch_compat import require_dcp_internals

require_dcp_internals()  # the metadata classes below are where this module expects them

from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,  # noqa: E402
                                                   StorageMeta)

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name to torch.strided & co
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle {module}.{name}: not part of DCP's checkpoint metadata")


def load_metadata(data: bytes, source: str) -> Metadata:
    """Unpickle `.metadata` bytes safely and check they describe tensors only."""
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{source}/.metadata: {e}") from None
    except Exception as e:
        raise UnsafeCheckpointError(f"{source}/.metadata is not valid DCP metadata "
                                    f"({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}/.metadata holds a {type(metadata).__name__}, "
                                    "not DCP Metadata")
    byte_entries = [k for k, v in metadata.state_dict_metadata.items()
                    if isinstance(v, BytesStorageMetadata)]
    if byte_entries:
        raise UnsafeCheckpointError(f"{source} has pickled byte entries {byte_entries[:3]}, "
                                    "which dcp_train never writes and will not unpickle")
    return metadata


class SafeMetadataReader:
    """Mixin for DCP's FileSystemReader/FsspecReader: read_metadata through load_metadata.
    A reader reads `.metadata` once (restore.load_into and dcp.load both ask for it; on an
    object store each read is a GET)."""

    def use_metadata(self, data: bytes) -> None:
        """Take `.metadata`'s bytes from the caller (read and checked once, at discovery)
        instead of reading the file."""
        self._safe_metadata = (self._get_metadata_path(None), data)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        cached = getattr(self, "_safe_metadata", None)
        if cached is None or cached[0] != path:
            with self.fs.create_stream(path, "rb") as f:
                self._safe_metadata = cached = (path, f.read())
        metadata = load_metadata(cached[1], str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
