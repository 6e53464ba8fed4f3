"""What-if variants for the profile: a DCP writer that checksums each file while writing it.

Our Checkpointer hashes every file after dcp.save has written it (a second pass over all the
bytes). This writer computes the digest on the way out instead: DCP opens each output file
through `FileSystem.create_stream`, so wrapping that stream sees every byte once, with no
re-read. `writer.digests` maps file name -> [size, hexdigest] after dcp.save returns.

Used by bench/ckpt_worker.py (--whatif) only, to measure what such a change to
dcp_train/checkpoint.py + storage.py would cost; dcp_train itself does not use it.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from contextlib import contextmanager

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def new_hasher(algo: str):
    return _Crc32() if algo == "crc32" else hashlib.new(algo)


class _HashingStream:
    """A write-only file wrapper that feeds every written byte to a hasher."""

    def __init__(self, stream, hasher):
        self._stream, self._hasher, self.size = stream, hasher, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self.size += view.nbytes
        return self._stream.write(data)

    def __getattr__(self, name):  # tell, flush, fileno, seekable, ...
        return getattr(self._stream, name)


class _HashingFS(FileSystem):
    def __init__(self, algo: str):
        super().__init__()
        self.algo = algo
        self.digests: dict[str, list] = {}

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            wrapped = _HashingStream(stream, new_hasher(self.algo))
            yield wrapped
            self.digests[os.path.basename(str(path))] = [wrapped.size,
                                                         wrapped._hasher.hexdigest()]

    def rename(self, path, new_path) -> None:  # .metadata.tmp -> .metadata
        super().rename(path, new_path)
        old, new = os.path.basename(str(path)), os.path.basename(str(new_path))
        if old in self.digests:
            self.digests[new] = self.digests.pop(old)


class HashingFileSystemWriter(FileSystemWriter):
    """FileSystemWriter(sync_files=True) that checksums its files while writing them."""

    def __init__(self, path, algo: str = "sha256", **kwargs):
        super().__init__(path, sync_files=True, **kwargs)
        self.fs = _HashingFS(algo)

    @property
    def digests(self) -> dict[str, list]:
        return self.fs.digests
