"""manifest.json: the list of every file of a step dir with its size and CRC-32, and the
check of a step dir against it. Writing it is the commit point of a save (protocol.py).

    {"step": 20, "world_size": 2,
     "files": {".metadata": {"size": 41234, "crc32": "9a0c1f3e"}, "__0_0.distcp": {...}, ...},
     "sha256": "<sha256 of the JSON above, keys sorted>"}

The manifest carries a checksum of itself, so a flipped byte anywhere in it is detected too.

Why CRC-32 (zlib) per file: the manifest guards against accidents (bit rot, truncated or
partial uploads, a half-copied dir), and CRC-32 detects every error of 1-3 flipped bits and
every burst up to 32 bits, and other random damage with probability 1 - 2^-32. It runs at
~4 GB/s per core here against ~1.5 GB/s for sha256 (bench/ measures both; when the manifest
used sha256, computed in a second pass after the write, it cost 40% of a GPT-2 124M save). A cryptographic hash would add
nothing against a deliberate attacker: the manifest is not signed, so whoever can rewrite a
shard can rewrite the manifest too; the defence there is safe_metadata.py (nothing in a
checkpoint is ever unpickled beyond DCP's metadata classes). zlib releases the GIL, so the
files of a step dir are checked on several threads at once. Each rank computes the checksums
of the files it writes while writing them (dcp_io.py); on resume, verification reads every
file once more, shared across ranks and at the same time as DCP's own read (protocol.py).
"""

from __future__ import annotations

import hashlib
import json
import zlib
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

from dcp_train.checkpoint.io.ranged_read import open_sized
from dcp_train.checkpoint.io.storage import Storage

MANIFEST = "manifest.json"
TIER = "tier.json"  # local tier only (tiers/local.py): not part of the checkpoint
STEP_RE = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20
_THREADS = 4


class ManifestError(ValueError):
    pass


class NotCommitted(ManifestError):
    """The dir has no manifest.json: a save in progress or abandoned, never a checkpoint."""


def hash_file(storage: Storage, path: str, size: int | None = None) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of one file; `size`, if known, spares an object store
    the HEAD that opening a file sends to learn it."""
    crc, size_read = 0, 0
    known = size is not None and not storage.is_local
    with (open_sized(storage.fs, path, size) if known else storage.fs.open(path, "rb")) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size_read += len(chunk)
    return size_read, f"{crc:08x}"


def hash_files(storage: Storage, dir_path: str, names: list[str],
               sizes: dict | None = None) -> dict[str, list]:
    """{name: [size, crc32]} of files in `dir_path`, checksummed on a few threads; sizes:
    {name: size} known beforehand (see hash_file)."""
    sizes = sizes or {}
    with ThreadPoolExecutor(max(1, min(_THREADS, len(names)))) as pool:
        results = pool.map(lambda n: hash_file(storage, posixpath.join(dir_path, n),
                                               sizes.get(n)), names)
        return {n: list(r) for n, r in zip(names, results)}


def _self_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build(step: int, world_size: int, files: dict[str, list]) -> bytes:
    body = {"step": step, "world_size": world_size,
            "files": {n: {"size": s, "crc32": h} for n, (s, h) in sorted(files.items())}}
    return json.dumps({**body, "sha256": _self_hash(body)}, indent=1).encode()


def read(storage: Storage, dir_path: str) -> dict:
    """The manifest of `dir_path` (one GET); NotCommitted if missing, ManifestError if
    unreadable or altered."""
    data = storage.read_optional(posixpath.join(dir_path, MANIFEST))
    if data is None:
        raise NotCommitted("no manifest.json: the checkpoint was never committed")
    try:
        manifest = json.loads(data)
        body = {k: manifest[k] for k in ("step", "world_size", "files")}
        ok = manifest["sha256"] == _self_hash(body)
        sizes = all(isinstance(v["size"], int) and isinstance(v["crc32"], str)
                    for v in body["files"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"manifest.json is unreadable ({type(e).__name__}: {e})") from None
    if not ok or not sizes:
        raise ManifestError("manifest.json is corrupt (its own checksum does not match)")
    return manifest


def corrupt(storage: Storage, dir_path: str, files: dict[str, dict]) -> list[str]:
    """A line for each of `files` ({name: manifest entry}) whose CRC-32 differs."""
    sizes = {n: v["size"] for n, v in files.items()}
    return [corrupt_line(n, digest, files[n]["crc32"])
            for n, (_, digest) in hash_files(storage, dir_path, sorted(files), sizes).items()
            if digest != files[n]["crc32"]]


def corrupt_line(name: str, digest: str, expected: str) -> str:
    return f"file {name} is corrupt (crc32 {digest}, manifest.json says {expected})"


def problems(storage: Storage, dir_path: str, deep=True, manifest: dict | None = None
             ) -> list[str]:
    """What is wrong with committed step dir `dir_path`; [] means intact.

    Always: the manifest itself (`manifest`, if already read), its step against the dir name,
    missing/extra files, sizes (one listing of the dir: object stores, one LIST request).
    deep=True also recomputes every file's CRC-32 (a flipped byte anywhere is found); a
    collection of names recomputes those files' only."""
    if manifest is None:
        try:
            manifest = read(storage, dir_path)
        except ManifestError as e:
            return [str(e)]
    files, found = manifest["files"], []
    name = posixpath.basename(dir_path.rstrip("/"))
    m = STEP_RE.match(name)
    if m and int(m.group(1)) != manifest["step"]:
        found.append(f"manifest.json says step {manifest['step']}, the dir is {name}")
    if ".metadata" not in files:
        found.append("manifest.json lists no .metadata")
    listed = storage.listing(dir_path)
    present = set(listed) - {MANIFEST, TIER}
    found += [f"extra file {n} (not in manifest.json)" for n in sorted(present - set(files))]
    found += [f"missing file {n}" for n in sorted(set(files) - present)]
    names = sorted(set(files) & present)
    sizes = {n: listed[n] for n in names}
    found += [f"file {n} has {sizes[n]} bytes, manifest.json says {files[n]['size']}"
              for n in names if sizes[n] != files[n]["size"]]
    if deep:
        found += corrupt(storage, dir_path, {n: files[n] for n in names if sizes[n] ==
                                             files[n]["size"] and (deep is True or n in deep)})
    return found
