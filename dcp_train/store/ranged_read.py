"""Reading whole objects whose sizes are known, without asking the store for them first.

    read_ranges(fs, {"s3://b/run/step_00000020/__0_0.distcp": 123456, ...})  # {path: bytes}

Each file goes as at most READ_PARTS concurrent ranged GETs of at least READ_CHUNK bytes
(fsspec's cat_ranges runs all the parts of every file at once), so a resume is bound by bytes,
not by round trips; knowing the sizes (from manifest.json) spares the HEAD s3fs would send to
learn each file's size. Why at most 4 parts: a part costs a request and, on some servers, far
more: moto_server (the test S3) reads the whole object for every ranged GET, so a 768 MB object
took 12.3 s as 24 parts of 32 MB, 4.0 s as 4 and 2.2 s as 1 (2026-12-07, loopback); on S3 and
GCS 4 streams per file and a file per rank's writer thread keep a rank's link busy
(dcp_io.WRITE_THREADS files per rank, ranks of a node in parallel). Used by storage.py and dcp_io.py; `open_sized` by dcp_io.py and manifest.py for
files read in parts.
"""

from __future__ import annotations

import bisect
import io

from fsspec.spec import AbstractBufferedFile

READ_CHUNK = 32 << 20  # bytes per ranged GET, at least (a smaller file: one GET)
READ_PARTS = 4  # ranged GETs per file, at most
SPAN_GAP = 1 << 20  # spans of a file closer than this are fetched as one ranged GET


def read_ranges(fs, sizes: dict[str, int]) -> dict[str, bytes]:
    """{path: content} of the files of `sizes` ({path: size}); OSError if one is shorter.
    Requests: min(READ_PARTS, ceil(size / READ_CHUNK)) ranged GETs of each file (none for
    an empty file)."""
    paths, starts, ends = [], [], []
    for path, size in sizes.items():
        part = max(READ_CHUNK, -(-size // READ_PARTS))
        for start in range(0, size, part):
            paths.append(path)
            starts.append(start)
            ends.append(min(size, start + part))
    chunks: dict[str, list[bytes]] = {path: [] for path in sizes}
    for path, part in zip(paths, _cat(fs, paths, starts, ends)):
        chunks[path].append(part)
    return {path: b"".join(c) for path, c in chunks.items()}  # a one-part file: not copied


def _cat(fs, paths: list, starts: list, ends: list) -> list[bytes]:
    """The ranges [start, end) of `paths`, all at once (fsspec's cat_ranges runs them
    concurrently); OSError for a range the file ends before."""
    parts = fs.cat_ranges(paths, starts, ends, on_error="raise") if paths else []
    for path, start, end, part in zip(paths, starts, ends, parts):
        if len(part) != end - start:
            raise OSError(f"{path} ended before byte {end}: {len(part)} of {end - start} "
                          f"bytes from byte {start}")
    return parts


def open_sized(fs, path: str, size: int):
    """fs.open(path, "rb") of a file whose size is known: no HEAD to learn it, nor for the
    ETag s3fs would compare each ranged read against (it sends a HEAD for that too)."""
    f = fs.open(path, "rb", size=size)
    if isinstance(f, AbstractBufferedFile) and getattr(f, "_details", 0) is None:
        f.details = {"name": path, "size": size, "type": "file"}
    return f


def read_spans(fs, spans: dict[str, list[tuple[int, int]]]) -> dict[str, dict[int, bytes]]:
    """The byte ranges `spans` ({path: [(offset, length), ...]}) of files, all at once: spans
    of a file that overlap or lie within SPAN_GAP of each other are merged, and each merged
    span is one ranged GET (fsspec's cat_ranges runs them concurrently). Returns {path:
    {offset: bytes}} of the merged spans; OSError if a file ends early."""
    paths, starts, ends = [], [], []
    for path, wanted in spans.items():
        for offset, length in sorted(wanted):
            if paths and paths[-1] == path and offset <= ends[-1] + SPAN_GAP:
                ends[-1] = max(ends[-1], offset + length)
            else:
                paths.append(path)
                starts.append(offset)
                ends.append(offset + length)
    out: dict[str, dict[int, bytes]] = {path: {} for path in spans}
    for path, start, part in zip(paths, starts, _cat(fs, paths, starts, ends)):
        out[path][start] = part
    return out


class SpanFile(io.RawIOBase):
    """A read-only, seekable file of `size` bytes of which only some ranges are held
    ({offset: bytes}, read_spans); reading a byte outside them raises OSError (DCP reads only
    the ranges its plan names, which is what was fetched)."""

    def __init__(self, spans: dict[int, bytes], size: int, name: str = ""):
        super().__init__()
        self._spans, self._starts = spans, sorted(spans)
        self._size, self._pos, self.name = size, 0, name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not view.nbytes:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        data = self._spans[self._starts[i]] if i >= 0 else b""
        offset = self._pos - (self._starts[i] if i >= 0 else 0)
        if offset >= len(data):
            raise OSError(f"{self.name}: byte {self._pos} was not fetched")
        n = min(view.nbytes, len(data) - offset)
        view[:n] = memoryview(data)[offset:offset + n]
        self._pos += n
        return n
