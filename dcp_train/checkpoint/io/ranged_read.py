"""Reading whole objects whose sizes are known, without asking the store for them first.

    read_ranges(fs, {"s3://b/run/step_00000020/__0_0.distcp": 123456, ...})  # {path: bytes}

Each file goes as ranged GETs of at most READ_CHUNK bytes, all of every file at once
(fsspec's cat_ranges runs them concurrently), so a resume is bound by bytes, not by round
trips; knowing the sizes (from manifest.json) spares the HEAD s3fs would send to learn each
file's size. Used by storage.py and dcp_io.py; `open_sized` by dcp_io.py and manifest.py for
files read in parts.
"""

from __future__ import annotations

from fsspec.spec import AbstractBufferedFile

READ_CHUNK = 32 << 20  # bytes per ranged GET


def read_ranges(fs, sizes: dict[str, int]) -> dict[str, bytes]:
    """{path: content} of the files of `sizes` ({path: size}); OSError if one has another
    size. Requests: one ranged GET per READ_CHUNK of each file (none for an empty file)."""
    paths, starts, ends = [], [], []
    for path, size in sizes.items():
        for start in range(0, size, READ_CHUNK):
            paths.append(path)
            starts.append(start)
            ends.append(min(size, start + READ_CHUNK))
    parts = fs.cat_ranges(paths, starts, ends, on_error="raise") if paths else []
    chunks: dict[str, list[bytes]] = {path: [] for path in sizes}
    for path, part in zip(paths, parts):
        chunks[path].append(part)
    out = {path: b"".join(c) for path, c in chunks.items()}  # a one-part file: not copied
    for path, size in sizes.items():
        if len(out[path]) != size:
            raise OSError(f"{path} has {len(out[path])} bytes, expected {size}")
    return out


def open_sized(fs, path: str, size: int):
    """fs.open(path, "rb") of a file whose size is known: no HEAD to learn it, nor for the
    ETag s3fs would compare each ranged read against (it sends a HEAD for that too)."""
    f = fs.open(path, "rb", size=size)
    if isinstance(f, AbstractBufferedFile) and getattr(f, "_details", 0) is None:
        f.details = {"name": path, "size": size, "type": "file"}
    return f
