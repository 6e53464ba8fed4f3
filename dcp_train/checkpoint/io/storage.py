"""Where checkpoints live: a local directory or any fsspec URL (s3://, gs://, memory://).

This module knows nothing about training. It gives one small file API over both worlds
and the DCP StorageWriter/StorageReader for a directory:

    st = Storage("s3://bucket/run1", {"endpoint_url": ...})   # or Storage("/tmp/run1")
    d = st.join("step_00000005.tmp-ab12")                     # a full path/URL
    dcp.save(state, storage_writer=st.dcp_writer(d))          # no checkpoint_id needed
    st.rename_dir(d, st.join("step_00000005"))
    st.write_atomic(st.join("latest"), b"step_00000005\\n")

Paths. Every method takes the full paths that `join` returns (a local path, or a URL
with its protocol), never bare bucket keys.

Atomicity.
- `write_atomic`: atomic.write_atomic (local: temp file + fsync + os.replace + fsync of the
  directory; object store: one PUT, which replaces an object atomically).
- `rename_dir`: local = os.rename (atomic). Object stores have no rename: every object is
  copied (server side), then the sources are deleted; NOT atomic, a crash can leave both
  or a partial destination. `last` names files to copy after all others, so a reader that
  trusts those files sees a complete directory. (fsspec's recursive mv is not used: it
  is broken for s3fs, fsspec/s3fs#394.)
- Listing caches of s3fs/gcsfs are dropped before every read of a listing or an
  existence check, because other processes (ranks) write to the same prefix.

DCP. `dcp_writer`/`dcp_reader` hand out the StorageWriter/StorageReader of dcp_io.py for a
local directory or a URL (checksums while writing, the traps of DCP's fsspec classes).

Errors when the endpoint is down (measured with s3fs 2026.9.0, gcsfs 2026.10.1):
- s3fs raises botocore.exceptions.EndpointConnectionError ("Could not connect to the
  endpoint URL"), which is NOT an OSError. Default botocore retries take ~9 s; env
  AWS_MAX_ATTEMPTS=2 AWS_RETRY_MODE=standard, or storage option
  config_kwargs={"retries": {"max_attempts": 2}, "connect_timeout": 5}, make it < 1 s.
- gcsfs raises aiohttp.ClientConnectorError (an OSError) after ~32 s: six attempts
  with exponential backoff, fixed by gcsfs (not configurable per filesystem).
"""

from __future__ import annotations

import os
import posixpath
import shutil

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dcp_train.checkpoint.io import dcp_io
from dcp_train.checkpoint.io.atomic import fsync_dir, write_atomic


class Storage:
    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(os.fspath(url), **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(root)
        else:  # keep the protocol so every path we hand out names its filesystem
            self.root = self.fs.unstrip_protocol(root.rstrip("/"))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- paths -------------------------------------------------------------------------

    def join(self, *parts: str) -> str:
        if self.is_local:
            return os.path.join(self.root, *parts)
        return posixpath.join(self.root, *(p.strip("/") for p in parts))

    def _fresh(self, path: str) -> str:
        """Drop cached listings so that we see what other processes wrote."""
        if not self.is_local:
            self.fs.invalidate_cache()
        return path

    # -- queries -----------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._fresh(path))

    def isdir(self, path: str) -> bool:
        """A directory (locally), or a prefix with objects under it (object stores)."""
        return self.fs.isdir(self._fresh(path))

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the entries directly under `path`, sorted; [] if missing."""
        try:
            entries = self.fs.ls(self._fresh(path), detail=False)
        except FileNotFoundError:
            return []
        base = self.fs._strip_protocol(path).rstrip("/")
        names = set()
        for e in entries:
            e = self.fs._strip_protocol(e).rstrip("/")
            if e != base:  # ls of a file lists the file itself
                names.add(posixpath.basename(e))
        return sorted(names)

    def size(self, path: str) -> int:
        return self.fs.size(self._fresh(path))

    def probe(self) -> None:
        """Raise now (not at the first write) if `root` cannot be used: endpoint unreachable,
        credentials refused, bucket missing. `root` itself need not exist yet. Remote only:
        lists `root`, or, when it is missing, its nearest existing ancestor (the bucket of a
        new run), so a missing bucket raises FileNotFoundError naming it."""
        if self.is_local:
            return
        path = self.fs._strip_protocol(self.root).rstrip("/")
        while True:
            try:
                self.fs.ls(self._fresh(path), detail=False)
                return
            except FileNotFoundError:
                parent = self.fs._parent(path)
                if not parent or parent == path:
                    raise FileNotFoundError(f"{self.fs.unstrip_protocol(path)} does not exist "
                                            "(no such bucket)") from None
                path = parent
            except PermissionError:
                if path == self.fs._strip_protocol(self.root).rstrip("/"):
                    raise  # the run must be able to list its own directory
                return  # credentials for a prefix only: the first save will tell

    def find(self, path: str) -> dict[str, int]:
        """All files under `path`, recursively: {relative posix path: size in bytes}."""
        base = self.fs._strip_protocol(path).rstrip("/")
        found = self.fs.find(self._fresh(path), detail=True)
        out = {}
        for name, info in found.items():
            rel = posixpath.relpath(self.fs._strip_protocol(name), base)
            if self.is_local:
                rel = rel.replace(os.sep, "/")
            out[rel] = int(info["size"])
        return out

    # -- reading and writing -----------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Plain write (not crash-safe locally; see write_atomic)."""
        if self.is_local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.fs.pipe_file(path, data)

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old content or the new one, never a mix or nothing (atomic.py)."""
        write_atomic(path, data, self.fs)

    # -- directories -------------------------------------------------------------------

    def rename_dir(self, src: str, dst: str, last: tuple[str, ...] = ()) -> None:
        """Move directory `src` to `dst`, which must not exist.

        Local: one atomic os.rename. Object store: copy each object server side (files named
        in `last`, relative to src, go after all others), then delete the sources.
        """
        if self.is_local:
            if os.path.exists(dst):
                raise FileExistsError(dst)
            os.rename(src, dst)
            fsync_dir(os.path.dirname(os.path.abspath(dst)))
            return
        files = self.find(src)
        if not files:
            raise FileNotFoundError(src)
        if self.find(dst):
            raise FileExistsError(dst)
        first = sorted(r for r in files if r not in last)
        if first:  # one call: async stores (s3fs, gcsfs) run the copies concurrently
            self.fs.copy([posixpath.join(src, r) for r in first],
                         [posixpath.join(dst, r) for r in first])
        for rel in [r for r in last if r in files]:
            self.fs.cp_file(posixpath.join(src, rel), posixpath.join(dst, rel))
        self._rm_remote(src, files)

    def rm_tree(self, path: str) -> None:
        """Delete a directory and everything under it (or a file); nothing if it is missing."""
        if self.is_local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            return
        self._rm_remote(path, self.find(path))

    def rm_file(self, path: str) -> None:
        """Delete one file; nothing if it is missing."""
        if self.is_local:
            if os.path.lexists(path):
                os.remove(path)
        elif self.exists(path):
            self.fs.rm_file(path)
            self.fs.invalidate_cache()

    def _rm_remote(self, path: str, files) -> None:
        if files:  # one batched delete where the store has one
            self.fs.rm([posixpath.join(path, rel) for rel in files])
        self.fs.invalidate_cache()
        if self.fs.exists(path):  # directory placeholders (memory://, "folder" objects)
            self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache()

    # -- DCP -----------------------------------------------------------------------------

    def dcp_writer(self, path: str, **kwargs):
        """A DCP StorageWriter for directory `path`; kwargs go to the writer
        (thread_count, single_file_per_rank, ...). After dcp.save, `writer.checksums` is
        {file name: [size, hex digest]} of the files this process wrote (checksum.CHECKSUM).

        Each rank writes dcp_io.WRITE_THREADS files (`__<rank>_0.distcp`, `__<rank>_1.distcp`)
        on as many threads, so one file's serialization overlaps the other's I/O. Measured here
        (1.58 GB at 1 rank, local ext4, page cache dropped): 1.85-2.0 s with one thread,
        1.2-1.5 s with two (raw write ~1.2 s); at 2 ranks on 2 cores no difference."""
        return dcp_io.writer(path, None if self.is_local else self.storage_options, **kwargs)

    def dcp_reader(self, path: str):
        """A DCP StorageReader for directory `path` that never unpickles anything but DCP's
        own metadata classes (safe_metadata.py)."""
        return dcp_io.reader(path, None if self.is_local else self.storage_options)

