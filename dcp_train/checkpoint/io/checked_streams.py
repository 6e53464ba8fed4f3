"""File wrappers that checksum the bytes passing through them (checksum.py), for dcp_io.py's
FileSystems: WriteChecksum on DCP's write streams (size and digest of each file written, no
second pass), ReadChecksum on its read streams (the pieces DCP reads, the rest read at the end),
Discard for a file that could not be opened (what DCP writes into it is dropped; the error is
raised by dcp_io's _CheckedWriter)."""

from __future__ import annotations

import io

from dcp_train.checkpoint.io import checksum as C
from dcp_train.job.faults import armed, fault_point


class WriteChecksum:
    """A write-only file wrapper that checksums everything written through it (CHECKSUM, on
    the writing thread: at ~13 GB/s a small share of the write's own time)."""

    def __init__(self, stream):
        self._stream, self.value, self.size = stream, 0, 0
        self._faults = armed()  # test-only fault points (os.environ costs 2% of a save)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.value = C.update(C.CHECKSUM, self.value, view)
        written = self._stream.write(view)
        self.size += view.nbytes
        if self._faults:
            fault_point("mid_shard")  # test-only: a file of this rank's is partly written
        return written

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self._stream, name)


class ReadChecksum:
    """A read-only file wrapper that checksums the pieces read through it (checksum.Pieces);
    `finish()` reads what was not read and returns [size, hex digest] of the whole file."""

    def __init__(self, stream, checksum: str):
        self._stream, self._pieces = stream, C.Pieces(checksum)

    def readinto(self, buffer) -> int:
        offset = self._stream.tell()
        n = self._stream.readinto(buffer)
        if n:
            self._pieces.add(offset, memoryview(buffer).cast("B")[:n])
        return n

    def read(self, size=-1) -> bytes:
        offset = self._stream.tell()
        data = self._stream.read(size)
        self._pieces.add(offset, data)
        return data

    def finish(self) -> list:
        size = self._stream.seek(0, io.SEEK_END)

        def read_at(offset: int, length: int) -> bytes:
            self._stream.seek(offset)
            return self._stream.read(length)
        return [size, C.hexdigest(self._pieces.finish(read_at, size))]

    def __getattr__(self, name):  # seek, tell, seekable, close, ...
        return getattr(self._stream, name)


class Discard:
    """Stands in for a file that could not be opened; what is written is dropped."""

    def __init__(self):
        self.position = 0

    def write(self, data) -> int:
        self.position += memoryview(data).nbytes
        return memoryview(data).nbytes

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
