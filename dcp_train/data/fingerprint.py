"""A cheap fingerprint of the training data, stored in every checkpoint and checked on resume.

`data_fingerprint(files)` is, per shard in the order given: its file name, its size in bytes
and a CRC-32 of SAMPLES fixed windows of SAMPLE_BYTES each (the first window holds the .npy
header and the first tokens; the others are spread evenly up to the file's last byte). So it
reads at most SAMPLES * SAMPLE_BYTES = 64 KiB per shard however big the shard is: the cost is
one open and 16 small reads per file, not the data size.

What it catches: another set of shards (names), shards added, removed or reordered, a shard
of another length, and other content of the same length unless every sampled window happens
to be equal (shards rewritten with another tokenizer, seed or source differ everywhere). It
does not prove two shards equal byte for byte; a full hash would read every byte on every
resume.

The directory is not part of it: the same shards moved to another --data_dir (or downloaded
from a URL into the cache) have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

SAMPLES = 16
SAMPLE_BYTES = 4096
VERSION = 1


def window_offsets(size: int) -> list[int]:
    """Start offsets of the sampled windows of a file of `size` bytes (fixed by the size)."""
    if size <= SAMPLES * SAMPLE_BYTES:
        return [0] if size else []  # small file: read whole (one window of `size` bytes)
    last = size - SAMPLE_BYTES
    return [last * i // (SAMPLES - 1) for i in range(SAMPLES)]


def file_fingerprint(path: str) -> dict:
    """{"name", "size", "crc32"} of one shard (see the module docstring)."""
    size = os.path.getsize(path)
    crc = 0
    with open(path, "rb") as f:
        offsets = window_offsets(size)
        length = size if offsets == [0] else SAMPLE_BYTES
        for offset in offsets:
            f.seek(offset)
            crc = zlib.crc32(f.read(length), crc)
    return {"name": os.path.basename(path), "size": size, "crc32": f"{crc:08x}"}


def data_fingerprint(files: list[str]) -> dict:
    """{"version", "files": [file_fingerprint...], "digest"} of shards `files`, in order.
    `digest` (16 hex digits of a SHA-256 of the list) is what a record or a message shows."""
    entries = [file_fingerprint(f) for f in files]
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": VERSION, "files": entries, "digest": digest}


def fingerprint_diff(saved: dict, current: dict, limit: int = 3) -> list[str]:
    """What differs between two fingerprints, in words ([] when equal); at most `limit`
    items and a count of the rest."""
    if saved.get("digest") == current.get("digest"):
        return []
    old = {e["name"]: e for e in saved.get("files", [])}
    new = {e["name"]: e for e in current.get("files", [])}
    found = [f"{n}: missing now" for n in old if n not in new]
    found += [f"{n}: new" for n in new if n not in old]
    for name in [n for n in old if n in new]:
        a, b = old[name], new[name]
        if a["size"] != b["size"]:
            found.append(f"{name}: {a['size']:,} bytes, now {b['size']:,}")
        elif a["crc32"] != b["crc32"]:
            found.append(f"{name}: same size, other content")
    if not found and list(old) != list(new):
        found.append("the same shards in another order")
    if not found:
        found.append(f"digest {saved.get('digest')} vs {current.get('digest')}")
    more = len(found) - limit
    return found[:limit] + ([f"{more} more"] if more > 0 else [])
