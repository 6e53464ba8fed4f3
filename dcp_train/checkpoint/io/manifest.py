"""manifest.json: the list of every file of a step dir with its size and checksum, and the
check of a step dir against it. Writing it is the commit point of a save (protocol.py).

    {"format_version": 2, "checksum": "crc32c", "step": 20, "world_size": 2,
     "files": {".metadata": {"size": 41234, "crc32c": "9a0c1f3e"}, "__0_0.distcp": {...}, ...},
     "sha256": "<sha256 of the JSON above, keys sorted>"}

The manifest carries a checksum of itself, so a flipped byte anywhere in it is detected too.
Format 1 (manifests without `format_version`, written before CRC-32C) holds zlib CRC-32s
under "crc32" and no `checksum` field; it still reads and verifies. A newer format, or a
checksum this build does not know, is one clear ManifestError naming it.

Why a CRC per file (checksum.py says which and why): the manifest guards against accidents
(bit rot, truncated or partial uploads, a half-copied dir). A cryptographic hash would add
nothing against a deliberate attacker: the manifest is not signed, so whoever can rewrite a
shard can rewrite the manifest too; the defence there is safe_metadata.py (nothing in a
checkpoint is ever unpickled beyond DCP's metadata classes). Each rank computes the checksums
of the files it writes while writing them, and of the files it reads while reading them
(dcp_io.py); `hash_files` is for the files no rank read (restore.py) and for dcp-ckpt verify.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

from dcp_train.checkpoint.io import checksum as C
from dcp_train.store.ranged_read import open_sized
from dcp_train.checkpoint.io.names import MANIFEST, METADATA, STEP_RE, TIER
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.errors import CheckpointError

FORMAT_VERSION = 2  # what this build writes; it reads 1 and 2
_CHUNK = 8 << 20
_THREADS = 4


class ManifestError(ValueError):
    """manifest.json is missing or damaged: the step dir is not a valid checkpoint."""


class NotCommitted(ManifestError):
    """The dir has no manifest.json: a save in progress or abandoned, never a checkpoint."""


class ManifestFormatError(CheckpointError):
    """manifest.json is in a format this build cannot read (a newer one): never taken for
    damage (discovery does not fall back past it), one error for the user."""


def hash_file(storage: Storage, path: str, checksum: str = C.CHECKSUM,
              size: int | None = None) -> tuple[int, str]:
    """(size, checksum as 8 hex digits) of one file; `size`, if known, spares an object
    store the HEAD that opening a file sends to learn it."""
    value, size_read = 0, 0
    known = size is not None and not storage.is_local
    with (open_sized(storage.fs, path, size) if known else storage.fs.open(path, "rb")) as f:
        while chunk := f.read(_CHUNK):
            value = C.update(checksum, value, chunk)
            size_read += len(chunk)
    return size_read, C.hexdigest(value)


def hash_files(storage: Storage, dir_path: str, names: list[str],
               checksum: str = C.CHECKSUM, sizes: dict | None = None) -> dict[str, list]:
    """{name: [size, checksum]} of files in `dir_path`, checksummed on a few threads; sizes:
    {name: size} known beforehand (see hash_file)."""
    sizes = sizes or {}
    with ThreadPoolExecutor(max(1, min(_THREADS, len(names)))) as pool:
        results = pool.map(lambda n: hash_file(storage, posixpath.join(dir_path, n), checksum,
                                               sizes.get(n)), names)
        return {n: list(r) for n, r in zip(names, results)}


def digest(entry: dict) -> tuple[str, str]:
    """(checksum name, hex digest) of one manifest file entry."""
    for name in C.ALGORITHMS:
        if name in entry:
            return name, entry[name]
    raise ManifestError(f"a file entry of manifest.json holds no checksum this build knows "
                        f"({sorted(entry)}); upgrade dcp_train")


def checksum_of(files: dict[str, dict]) -> str:
    """The checksum name the entries of `files` (manifest.json's) use."""
    return digest(next(iter(files.values())))[0] if files else C.CHECKSUM


def _self_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build(step: int, world_size: int, files: dict[str, list],
          checksum: str = C.CHECKSUM) -> bytes:
    """manifest.json's bytes; `files`: {name: [size, hex digest of `checksum`]}."""
    body = {"format_version": FORMAT_VERSION, "checksum": checksum, "step": step,
            "world_size": world_size,
            "files": {n: {"size": s, checksum: h} for n, (s, h) in sorted(files.items())}}
    return json.dumps({**body, "sha256": _self_hash(body)}, indent=1).encode()


def read(storage: Storage, dir_path: str) -> dict:
    """The manifest of `dir_path` (one GET; format 1 given `checksum` "crc32"); NotCommitted
    if missing, ManifestError if unreadable or altered, ManifestFormatError if in a format this
    build cannot read."""
    path = posixpath.join(dir_path, MANIFEST)
    data = storage.read_optional(path)
    if data is None:
        raise NotCommitted("no manifest.json: the checkpoint was never committed")
    try:
        manifest = json.loads(data)
        version = manifest.get("format_version", 1)
        if version not in (1, FORMAT_VERSION) or manifest.get("checksum", "crc32") not in \
                C.ALGORITHMS:
            raise ManifestFormatError(
                f"{path} has manifest format {version!r} with checksum "
                f"{manifest.get('checksum', 'crc32')!r}, newer than this dcp_train reads "
                f"(formats 1-{FORMAT_VERSION}, checksums {', '.join(C.ALGORITHMS)}); resume it "
                "with the dcp_train version that wrote it, or upgrade")
        keys = ("step", "world_size", "files") + (("format_version", "checksum")
                                                   if version > 1 else ())
        body = {k: manifest[k] for k in keys}
        checksum = manifest.setdefault("checksum", "crc32")
        ok = manifest["sha256"] == _self_hash(body)
        sizes = all(isinstance(v["size"], int) and isinstance(v[checksum], str)
                    for v in body["files"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"manifest.json is unreadable ({type(e).__name__}: {e})") from None
    if not ok or not sizes:
        raise ManifestError("manifest.json is corrupt (its own checksum does not match)")
    return manifest


def corrupt(storage: Storage, dir_path: str, files: dict[str, dict]) -> list[str]:
    """A line for each of `files` ({name: manifest entry}) whose checksum differs."""
    checksum = checksum_of(files)
    sizes = {n: v["size"] for n, v in files.items()}
    return [corrupt_line(n, value, files[n])
            for n, (_, value) in hash_files(storage, dir_path, sorted(files), checksum,
                                            sizes).items()
            if value != digest(files[n])[1]]


def corrupt_line(name: str, value: str, entry: dict) -> str:
    checksum, expected = digest(entry)
    return f"file {name} is corrupt ({checksum} {value}, manifest.json says {expected})"


def problems(storage: Storage, dir_path: str, deep=True, manifest: dict | None = None
             ) -> list[str]:
    """What is wrong with committed step dir `dir_path`; [] means intact.

    Always: the manifest itself (`manifest`, if already read), its step against the dir name,
    missing/extra files, sizes (one listing of the dir: object stores, one LIST request).
    deep=True also recomputes every file's checksum (a flipped byte anywhere is found); a
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
    if METADATA not in files:
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


def require_intact(storage: Storage, dir_path: str) -> dict:
    """The manifest of committed step dir `dir_path` after a full check (`problems`, every
    file's CRC-32): what every tool that reads tensors calls first, as resume does. Raises
    ManifestError, one line naming every problem, for a damaged, truncated, incomplete or
    uncommitted dir."""
    if not storage.exists(dir_path):
        raise ManifestError(f"{dir_path} does not exist")
    found = problems(storage, dir_path, deep=True)
    if found:
        raise ManifestError(f"{dir_path} is damaged: {'; '.join(found)}; nothing was read from "
                            "it (dcp-ckpt verify lists the problems; an older step may be "
                            "intact, see dcp-ckpt ls)")
    return read(storage, dir_path)
