"""The checksums of checkpoint files, computed on the bytes as they pass: while DCP writes them
(a stream wrapper, dcp_io.py) and while DCP reads them back (the same, on the read side).

Algorithms, by the name manifest.json gives them (its `checksum` field):
- "crc32c": CRC-32C (Castagnoli), what this build writes. The `crc32c` package computes it
  with the CPU's CRC32 instruction (13 GB/s on one core here against 3.8 GB/s for zlib's
  CRC-32, bench/checksums.py) and releases the GIL. CRC-32C detects every burst of up to 32
  flipped bits and other random damage with probability 1 - 2^-32, like CRC-32, with a larger
  Hamming distance at shard-file lengths; it is also the checksum GCS keeps for every object.
- "crc32": zlib's CRC-32, what manifests without `format_version` (format 1) hold.

Why a CRC and not xxHash (faster still, 64 bits): a CRC of a file can be assembled from the
CRCs of its pieces (`combine`), so the load can checksum each tensor's bytes in whatever
order DCP reads them (torch.load reads a tensor's zip record headers back to front) and
read only the bytes nobody asked for; xxHash needs its bytes in file order.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import crc32c as _crc32c

CHECKSUM = "crc32c"  # what this build writes
_FUNCS = {"crc32c": _crc32c.crc32c, "crc32": zlib.crc32}  # fn(data, value) -> int
_POLYS = {"crc32c": 0x82F63B78, "crc32": 0xEDB88320}  # reflected polynomials
ALGORITHMS = tuple(_FUNCS)
_CHUNK = 8 << 20
PIECE_MIN = 64 << 10  # a smaller read is left as a gap and read once more at the end


def update(checksum: str, value: int, data) -> int:
    """`value` extended by the bytes of `data` (any buffer)."""
    return _FUNCS[checksum](data, value)


def hexdigest(value: int) -> str:
    return f"{value:08x}"


def _multmodp(poly: int, a: int, b: int) -> int:
    """a * b modulo the polynomial (bit-reflected), as zlib's crc32_combine does."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1


@lru_cache(maxsize=4096)
def _shift(checksum: str, nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending `nbytes` bytes does to a CRC."""
    poly, p, k = _POLYS[checksum], 1 << 31, 3  # x^0; squarings start at x^(2^3)
    square = 1 << 30  # x^1
    for _ in range(k):
        square = _multmodp(poly, square, square)
    while nbytes:
        if nbytes & 1:
            p = _multmodp(poly, square, p)
        nbytes >>= 1
        square = _multmodp(poly, square, square)
    return p


def combine(checksum: str, crc1: int, crc2: int, len2: int) -> int:
    """The CRC of A + B from CRC(A), CRC(B) and len(B) (zlib's crc32_combine)."""
    return _multmodp(_POLYS[checksum], _shift(checksum, len2), crc1) ^ crc2


class Pieces:
    """The checksum of one file assembled from the pieces that were read of it, in any order.

    `add(offset, data)` checksums a piece as it passes (pieces under PIECE_MIN are skipped: they
    are read once more at the end, cheaper than a combine each). `finish(read_at, size)`
    reads what no piece covered (gaps, overlaps, the tail) through `read_at(offset, length)`
    and returns the checksum of the whole file, as if it had been read from start to end."""

    def __init__(self, checksum: str):
        self.checksum, self.pieces = checksum, []

    def add(self, offset: int, data) -> None:
        n = memoryview(data).nbytes
        if n >= PIECE_MIN:
            self.pieces.append((offset, n, update(self.checksum, 0, data)))

    def finish(self, read_at, size: int) -> int:
        value, pos = 0, 0
        for offset, n, crc in sorted(self.pieces, key=lambda p: (p[0], -p[1])):
            if offset + n <= pos or offset + n > size:
                continue  # covered already, or past the end (cannot be: then it is a gap)
            if offset != pos:  # a gap before it, or an overlap: read from pos to its end
                value = self._read(value, read_at, pos, offset + n if offset < pos else offset)
                if offset < pos:
                    pos = offset + n
                    continue
            value, pos = combine(self.checksum, value, crc, n), offset + n
        return self._read(value, read_at, pos, size)

    def _read(self, value: int, read_at, start: int, end: int) -> int:
        while start < end:
            data = read_at(start, min(_CHUNK, end - start))
            if not data:
                raise OSError(f"file ended at byte {start}, expected {end}")
            value = update(self.checksum, value, data)
            start += len(data)
        return value
