"""manifest.json: the list of every file of a step dir with its size and sha256, and the
check of a step dir against it. Writing it is the commit point of a save (checkpoint.py).

    {"step": 20, "world_size": 2,
     "files": {".metadata": {"size": 41234, "sha256": "..."}, "__0_0.distcp": {...}, ...},
     "sha256": "<sha256 of the JSON above, keys sorted>"}

The manifest carries a checksum of itself, so a flipped byte anywhere in it is detected too.

Why sha256: it is in hashlib (no dependency), collision resistant, and runs on the SHA-NI
instructions of current x86 CPUs (0.7-2 GB/s per core here; hashlib releases the GIL, so the
files of a step dir are hashed on several threads at once). Each rank hashes the files it
wrote right after writing them; verification on load reads every file once more. The cost on
a GPT-2 124M checkpoint is measured by the benchmark (bench/, README).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

from dcp_train.storage import Storage

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20
_THREADS = 4


class ManifestError(ValueError):
    pass


def hash_file(storage: Storage, path: str) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with storage.fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def hash_files(storage: Storage, dir_path: str, names: list[str]) -> dict[str, list]:
    """{name: [size, sha256]} of files in `dir_path`, hashed on a few threads."""
    with ThreadPoolExecutor(max(1, min(_THREADS, len(names)))) as pool:
        results = pool.map(lambda n: hash_file(storage, posixpath.join(dir_path, n)), names)
        return {n: list(r) for n, r in zip(names, results)}


def _self_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build(step: int, world_size: int, files: dict[str, list]) -> bytes:
    body = {"step": step, "world_size": world_size,
            "files": {n: {"size": s, "sha256": h} for n, (s, h) in sorted(files.items())}}
    return json.dumps({**body, "sha256": _self_hash(body)}, indent=1).encode()


def read(storage: Storage, dir_path: str) -> dict:
    """The manifest of `dir_path`; ManifestError if missing, unreadable or altered."""
    path = posixpath.join(dir_path, MANIFEST)
    if not storage.exists(path):
        raise ManifestError("no manifest.json: the checkpoint was never committed")
    try:
        manifest = json.loads(storage.read_bytes(path))
        body = {k: manifest[k] for k in ("step", "world_size", "files")}
        ok = manifest["sha256"] == _self_hash(body)
        sizes = all(isinstance(v["size"], int) and isinstance(v["sha256"], str)
                    for v in body["files"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"manifest.json is unreadable ({type(e).__name__}: {e})") from None
    if not ok or not sizes:
        raise ManifestError("manifest.json is corrupt (its own checksum does not match)")
    return manifest


def problems(storage: Storage, dir_path: str, deep: bool = True) -> list[str]:
    """What is wrong with committed step dir `dir_path`; [] means intact.

    Always: the manifest itself, its step against the dir name, missing/extra files, sizes.
    deep=True also recomputes every file's sha256 (a flipped byte anywhere is found)."""
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
    present = set(storage.listdir(dir_path)) - {MANIFEST}
    found += [f"extra file {n} (not in manifest.json)" for n in sorted(present - set(files))]
    found += [f"missing file {n}" for n in sorted(set(files) - present)]
    names = sorted(set(files) & present)
    sizes = {n: storage.size(posixpath.join(dir_path, n)) for n in names}
    found += [f"file {n} has {sizes[n]} bytes, manifest.json says {files[n]['size']}"
              for n in names if sizes[n] != files[n]["size"]]
    if deep:
        same_size = [n for n in names if sizes[n] == files[n]["size"]]
        for n, (_, digest) in hash_files(storage, dir_path, same_size).items():
            if digest != files[n]["sha256"]:
                found.append(f"file {n} is corrupt (sha256 {digest[:12]}..., manifest.json "
                             f"says {files[n]['sha256'][:12]}...)")
    return found
