"""`--data_dir` as an fsspec URL (s3://, gs://, ...): shards are downloaded once into a local
cache, and find_shards/TokenShards then memory-map the local copies as usual.

    local_dir = fetch_shards("s3://bucket/fineweb10B", {"endpoint_url": ...})

Cache: `$DCP_TRAIN_CACHE_DIR/data/<sha256 of the URL, 16 hex>/` (default
`~/.cache/dcp_train/data/...`), one per URL. Only the shard files (`*_train_*.npy`,
`*_val_*.npy`) directly under the URL are fetched. A cached file whose size equals the remote
one is not downloaded again (delete the cache dir after rewriting a shard in place with the same
size). Each file is downloaded to a unique temp name in the cache dir and renamed into place
(os.replace, atomic), so processes sharing a cache (the ranks of a node, or nodes on a shared
file system) never see a partial shard; at worst two of them download the same file.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil

from dcp_train.store import options as store_options
from dcp_train.store.atomic import write_atomic
from ..errors import one_line
from .shards import DataError


def is_remote(data_dir: str) -> bool:
    """True for a URL of a non-local filesystem (file:// and plain paths are local)."""
    return "://" in data_dir and not data_dir.startswith("file://")


def cache_dir(url: str, kind: str = "data") -> str:
    """$DCP_TRAIN_CACHE_DIR/<kind>/<sha256 of the URL, 16 hex> (kind: data, init)."""
    base = os.environ.get("DCP_TRAIN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcp_train")
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(base, kind, key)


def _is_shard(name: str) -> bool:
    return name.endswith(".npy") and not name.startswith(".") and (
        "_train_" in name or "_val_" in name)


def fetch_shards(url: str, storage_options: dict) -> str:
    """Download the shards under `url` into cache_dir(url) (if not there yet); return that dir."""

    local = cache_dir(url)
    try:
        fs, root = store_options.url_to_fs(url, storage_options)
        root = root.rstrip("/")
        remote = {posixpath.basename(info["name"].rstrip("/")): info
                  for info in fs.ls(root, detail=True)}
    except FileNotFoundError:
        raise DataError(f"data dir {url} does not exist; upload the token shards there "
                        "(python -m dcp_train.data.prepare writes them)") from None
    except Exception as e:  # endpoint unreachable, credentials refused, s3fs/gcsfs missing
        raise DataError(f"cannot read data dir {url}: {one_line(e)}") from None
    shards = {n: i for n, i in remote.items() if _is_shard(n) and i.get("type") != "directory"}
    if not shards:
        raise DataError(f"data dir {url} holds no *_train_*.npy / *_val_*.npy shard")
    download(fs, root, shards, local, url)
    return local


def download(fs, root: str, files: dict[str, dict], local: str, url: str) -> None:
    """Copy `files` ({name: fsspec info}) from `root` on `fs` into the local dir `local`, each
    atomically; a local file of the remote size is kept. DataError naming the file on failure."""
    os.makedirs(local, exist_ok=True)
    for name, info in sorted(files.items()):
        dst = os.path.join(local, name)
        if os.path.isfile(dst) and os.path.getsize(dst) == int(info["size"]):
            continue
        src = posixpath.join(root, name)
        try:
            write_atomic(dst, lambda f: _copy(fs, src, f))
        except Exception as e:
            raise DataError(f"downloading {posixpath.join(url.rstrip('/'), name)} to {dst} "
                            f"failed: {one_line(e)}") from None


def _copy(fs, src: str, f) -> None:
    with fs.open(src, "rb") as r:
        shutil.copyfileobj(r, f, 8 << 20)

