"""DCP's StorageWriter/StorageReader for one checkpoint directory, local or a URL (torch 2.11-2.13:
the private parts used here are checked on import, torch_compat.py).
Storage.dcp_writer/dcp_reader (storage.py) hand them out; nothing else uses this module.

Local paths use FileSystemWriter/FileSystemReader (sync_files=True: each file is fsynced).
Every writer checksums what it writes on the way out: DCP opens each file through its
FileSystem's `create_stream`, and ours wraps that stream (checked_streams.py) so every byte is
fed to the checksum (checksum.py: CRC-32C at ~13 GB/s, on the writing thread) as it is
written. `writer.checksums` then maps each file this process wrote to [size, hex digest],
which is what manifest.json records; no second pass over the bytes. Readers do the same on
the way in once `verify_with(checksum)` was called (restore.py): each file this rank reads
half or more of is checksummed piece by piece as DCP reads it, and what DCP skipped of it
(zip headers, other ranks' entries) is read at the end; `reader.digests` then maps those
files to [size, hex digest]. Remote paths use subclasses of the fsspec ones in
torch.distributed.checkpoint._fsspec_filesystem that fix three traps:
- storage options: DCP calls `writer.reset(checkpoint_id)`, which rebuilds the
  filesystem from the URL alone and drops options given to the writer; ours keeps them,
  so passing `checkpoint_id=` to dcp.save/load as well is harmless.
- sync_files=False: with True DCP falls back to os.sync() for files without fileno();
  an object is durable once its upload returned.
- `.metadata`: DCP writes `.metadata.tmp` and renames it; on an object store a rename is a
  copy (s3fs: HEAD, GET, PUT, DELETE; gcsfs's `moveTo` the GCS emulator lacks). Ours writes
  `.metadata` under its final name, one PUT: the manifest PUT after it is the commit point,
  so a half-written save is never taken for a whole one (protocol.py).
- requests: no `mkdir` (a prefix is no directory) and no look for an existing `.metadata`
  before writing (protocol.py clears a step dir of a crashed attempt first), so a save
  sends one PUT per small file (a multipart upload for large ones) and nothing else.

Threads. Each rank writes WRITE_THREADS files on as many threads. torch 2.13's writer loses
an exception raised on its extra threads (pytorch/pytorch#191391); _CheckedWriter raises it.

Reading. Both readers unpickle nothing but DCP's own metadata classes (safe_metadata.py). The
remote reader fetches a file it needs most of in one go (concurrent ranged GETs), checksumming
it on arrival: DCP's own reads would be one ranged GET per tensor, and the check a
second download. Given the manifest's sizes and `.metadata`'s bytes (read once by rank 0 at
discovery and broadcast), it sends no HEAD and no GET of `.metadata`: a rank's resume is the
ranged GETs of the files it reads.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from dcp_train.torch_compat import require_dcp_internals

require_dcp_internals()  # the private DCP parts below exist in this torch, or one clear error

from torch.distributed.checkpoint import DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFS  # noqa: E402
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter  # noqa: E402
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION  # noqa: E402
from torch.distributed.checkpoint.filesystem import FileSystem as _LocalFS  # noqa: E402

from dcp_train.checkpoint.io import checksum as C  # noqa: E402
from dcp_train.checkpoint.io.store_errors import at_source  # noqa: E402
from dcp_train.checkpoint.io.ranged_read import (  # noqa: E402
    SpanFile, open_sized, read_ranges, read_spans)
from dcp_train.checkpoint.io.checked_streams import (  # noqa: E402
    Discard, ReadChecksum, WriteChecksum)
from dcp_train.checkpoint.io.safe_metadata import SafeMetadataReader  # noqa: E402
from dcp_train.run.progress import received_bytes  # noqa: E402

WRITE_THREADS = 2


def writer(path: str, storage_options: dict | None, **kwargs):
    """The StorageWriter for directory `path`: local if storage_options is None, else fsspec
    with those options. kwargs go to DCP's writer; thread_count defaults to WRITE_THREADS."""
    kwargs.setdefault("thread_count", WRITE_THREADS)
    if storage_options is None:
        return _LocalWriter(path, **kwargs)
    return _RemoteWriter(path, storage_options, **kwargs)


def save_planner(storage_options: dict | None):
    """The SavePlanner for dcp.save (None: DCP's default). Remote: entries every rank holds
    alike (replicated: step counters, RNG-free config, ...) are written by rank 0 alone. DCP's
    default spreads them over all ranks' files, so at N ranks every rank would read ranges of
    up to N files on resume: N^2 requests on an object store. Locally a read costs no request,
    and DCP's default stays."""
    if storage_options is None:
        return None
    return DefaultSavePlanner(dedup_save_to_lowest_rank=True)


def reader(path: str, storage_options: dict | None, sizes: dict | None = None,
           metadata: bytes | None = None):
    """The StorageReader for directory `path` (local if storage_options is None). sizes:
    {file name: size} (the manifest's), metadata: `.metadata`'s bytes, already checked: both
    spare the remote reader requests (the local one ignores them)."""
    if storage_options is None:
        return _LocalReader(path)
    return _RemoteReader(path, storage_options, sizes or {}, metadata)


class _Checksums:
    """Mixin for DCP's FileSystem classes: `checksums` {file name: [size, hex digest]} of
    every file written through create_stream (recorded once the file is closed), and
    `errors`, what failed while writing one (raised by _CheckedWriter.write_data)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checksums: dict[str, list] = {}
        self.errors: list[Exception] = []

    @contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        # an error is kept for write_data, not raised: on DCP's extra writer threads it would
        # be lost (see _CheckedWriter)
        wrapped = None
        try:
            with super().create_stream(path, mode) as stream:
                wrapped = WriteChecksum(stream)
                yield wrapped
        except Exception as e:
            self.errors.append(e)
            if wrapped is None:  # the file could not even be opened: DCP writes into nothing
                yield Discard()
            return
        self.checksums[posixpath.basename(str(path))] = [wrapped.size,
                                                          C.hexdigest(wrapped.value)]

    def rename(self, path, new_path) -> None:  # DCP: .metadata.tmp -> .metadata
        super().rename(path, new_path)
        old = posixpath.basename(str(path))
        if old in self.checksums:
            self.checksums[posixpath.basename(str(new_path))] = self.checksums.pop(old)


class _CheckedWriter:
    """Mixin for DCP's writers (whose `fs` is a _Checksums): `checksums` of the files written,
    and a write_data that fails when any of its threads failed.

    torch 2.13's FileSystemWriter with thread_count > 1 loses an exception raised on one of
    its extra threads: it only reaches threading.excepthook, and the save is reported complete
    with a `.metadata` that names data never written (pytorch/pytorch#191391). Here every
    failure inside a file's stream is kept and raised once all threads are done, and a write
    that returns fewer results than it had items fails too."""

    @property
    def checksums(self) -> dict[str, list]:
        return self.fs.checksums

    def write_data(self, plan, planner):
        with at_source(str(self.path)):  # a store failure typed before DCP pickles it
            future = super().write_data(plan, planner)
            if self.fs.errors:
                raise self.fs.errors[0]
            written = len(future.wait())
        if written != len(plan.items):
            raise OSError(f"DCP wrote {written} of {len(plan.items)} items of {self.path}: "
                          "a writer thread failed")
        return future


class _ChecksummingLocalFS(_Checksums, _LocalFS):
    pass


class _LocalWriter(_CheckedWriter, FileSystemWriter):
    def __init__(self, path: str, **kwargs):
        super().__init__(path, sync_files=True, **kwargs)
        self.fs = _ChecksummingLocalFS()


class _Digests:
    """What reading FileSystems share: `digests` {file name: [size, hex digest]} of the files
    named in `verify` (set by the reader before DCP reads), checksummed with `checksum` (None:
    nothing is checksummed) while DCP reads them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checksum: str | None = None
        self.verify: set[str] = set()
        self.digests: dict[str, list] = {}


class _DigestingLocalFS(_Digests, _LocalFS):
    @contextmanager
    def create_stream(self, path, mode):
        name = posixpath.basename(str(path))
        with super().create_stream(path, mode) as stream:
            if "r" not in mode or self.checksum is None or name not in self.verify:
                yield stream
                return
            wrapped = ReadChecksum(stream, self.checksum)
            yield wrapped
            self.digests[name] = wrapped.finish()


class _RemoteFS(_Digests, _FsspecFS):
    """torch's fsspec FileSystem that keeps the storage options across reset(), has no
    directories to make, and serves the files it prefetched whole (`verify`) from memory,
    checksummed as they arrived. sizes: {file name: size} known beforehand (opening or
    prefetching one of those sends no HEAD)."""

    def __init__(self, fs, storage_options: dict, sizes: dict | None = None):
        super().__init__()
        self.fs = fs
        self.storage_options = storage_options
        self.sizes = dict(sizes or {})
        self.whole: dict[str, Future] = {}  # prefetched: (bytes, digest), until DCP opens them
        self.parts: dict[str, tuple] = {}  # (Future of read_spans, path) of files read in part

    @contextmanager
    def create_stream(self, path, mode):
        name = posixpath.basename(str(path))
        if "r" in mode and name in self.whole:
            data, digest = self.whole.pop(name).result()  # waits for this file's download
            if digest is not None:
                self.digests[name] = digest
            yield io.BytesIO(data)
            return
        if "r" in mode and name in self.parts:
            batch, full = self.parts.pop(name)
            yield SpanFile(batch.result()[full], self.sizes[name], name)
            return
        if "r" in mode and name in self.sizes:
            with open_sized(self.fs, path, self.sizes[name]) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            yield stream

    def prefetch(self, paths: list[str], spans: dict[str, list] | None = None) -> None:
        """Download `paths` whole, in the order given (the order DCP opens them), one file
        after the other on a background thread, so that DCP deserializes a file while the
        next one downloads (create_stream waits for its file). A file of known size goes as
        concurrent ranged GETs (ranged_read.py, no HEAD), one of unknown size by fsspec's
        cat_file (gcsfs asked for concurrent ranges). Each file is checksummed on the
        download thread as it arrives (crc32c releases the GIL). Before them, `spans`
        ({path: [(offset, length)]}, files of known size DCP reads only parts of: entries
        rank 0 alone saved, other ranks' files after a change of world size) are fetched in
        one batch of concurrent ranged GETs (read_spans), not piece by piece as DCP reads."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="dcp_train-fetch")
        if spans:
            batch = pool.submit(read_spans, self.fs, spans)
            self.parts = {posixpath.basename(p): (batch, p) for p in spans}
        self.whole = {posixpath.basename(p): pool.submit(self._fetch, p) for p in paths}
        pool.shutdown(wait=False)  # the thread ends after the last file

    def _fetch(self, path: str) -> tuple[bytes, list | None]:
        name = posixpath.basename(path)
        if name in self.sizes:
            data = read_ranges(self.fs, {path: self.sizes[name]})[path]
        elif {"gs", "gcs"} & set(_protocols(self.fs)):
            data = self.fs.cat_file(path, concurrency=FETCH_CONCURRENCY)
        else:
            data = self.fs.cat_file(path)
        if self.checksum is None:
            return data, None
        return data, [len(data), C.hexdigest(C.update(self.checksum, 0, data))]

    def init_path(self, path, **kwargs):
        return super().init_path(path, **{**self.storage_options, **kwargs})

    def mkdir(self, path) -> None:
        pass  # a prefix needs no directory (s3fs would look for the bucket: a HEAD)


class _ChecksummingRemoteFS(_Checksums, _RemoteFS):
    pass


class _RemoteWriter(_CheckedWriter, FsspecWriter):
    """Writes into a step dir that holds nothing of another attempt (protocol.py clears
    it), so it neither looks for an existing `.metadata` nor makes directories, and writes
    `.metadata` under its final name."""

    def __init__(self, path: str, storage_options: dict, **kwargs):
        kwargs.setdefault("sync_files", False)
        super().__init__(path, **kwargs, **storage_options)
        self.fs = _ChecksummingRemoteFS(self.fs.fs, storage_options)

    def _metadata_exists(self) -> bool:
        return False  # DCP would only warn about it; looking costs a HEAD and a LIST

    def finish(self, metadata, results) -> None:
        """DCP's finish (coordinator only), but one PUT of `.metadata` instead of a PUT of
        `.metadata.tmp` and a rename (a copy: HEAD, GET, PUT, DELETE)."""
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        metadata.storage_meta = self.storage_meta()
        with at_source(str(self.path)), self.fs.create_stream(self._get_metadata_path(),
                                                              "wb") as f:
            pickle.dump(metadata, f)


class _VerifyingReader:
    """Mixin for DCP's readers (whose `fs` is a _Digests): after `verify_with(checksum)`, the
    files this rank reads half or more of (at the saved world size: its own shard files) are
    checksummed while DCP reads them, into `digests` {name: [size, hex digest]}; restore.py
    compares those with the manifest and checks the files no rank read."""

    def verify_with(self, checksum: str, only=None) -> None:
        """Checksum with `checksum` what is read; only the files in `only`, if given (the
        local tier's: a node's dir holds other nodes' files in part, tiers.py)."""
        self.fs.checksum, self._only = checksum, only

    def mostly_read(self, plan) -> set[str]:
        """The files `plan` reads half the bytes or more of (and `only` names)."""
        total, wanted = {}, {}
        for info in self.storage_data.values():
            total[info.relative_path] = total.get(info.relative_path, 0) + info.length
        for index in {item.storage_index for item in plan.items}:
            info = self.storage_data[index]
            wanted[info.relative_path] = wanted.get(info.relative_path, 0) + info.length
        only = getattr(self, "_only", None)
        return {name for name, n in wanted.items()
                if 2 * n >= total[name] and (only is None or name in only)}

    @property
    def digests(self) -> dict[str, list]:
        return self.fs.digests


class _LocalReader(_VerifyingReader, SafeMetadataReader, FileSystemReader):
    def __init__(self, path: str):
        super().__init__(path)
        self.fs = _DigestingLocalFS()

    def read_data(self, plan, planner):
        if self.fs.checksum is not None:
            self.fs.verify = self.mostly_read(plan)
        return super().read_data(plan, planner)


class _RemoteReader(_VerifyingReader, SafeMetadataReader, FsspecReader):
    """Downloads the files this rank needs most of whole and all at once before DCP reads
    them, and holds them in memory meanwhile (about this rank's share of the checkpoint); the
    others are read with ranged reads of what it needs. The files fetched whole are the ones
    checksummed (`digests`), so their check needs no second download (restore.py)."""

    def __init__(self, path: str, storage_options: dict, sizes: dict, metadata: bytes | None):
        super().__init__(path, **storage_options)
        self.fs = _RemoteFS(self.fs.fs, storage_options, sizes)
        if metadata is not None:
            self.use_metadata(metadata)

    def read_data(self, plan, planner):
        self.fs.verify = self.mostly_read(plan)
        order = dict.fromkeys(self.storage_data[item.storage_index].relative_path
                              for item in plan.items)  # the order DCP opens the files in
        fetched = [name for name in order if name in self.fs.verify]
        spans: dict[str, list] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if info.relative_path not in self.fs.verify and info.relative_path in self.fs.sizes:
                spans.setdefault(self.fs.concat_path(self.path, info.relative_path), []).append(
                    (info.offset, info.length))
        nbytes = sum(info.length for info in self.storage_data.values()
                     if info.relative_path in self.fs.verify)
        with at_source(str(self.path)):  # a store failure typed before DCP pickles it
            self.fs.prefetch([self.fs.concat_path(self.path, name) for name in fetched], spans)
            with received_bytes("checkpoint download", nbytes, int(os.environ.get("RANK", 0))):
                return super().read_data(plan, planner)


FETCH_CONCURRENCY = 8  # concurrent ranged GETs of one file of unknown size (gcsfs)


def _protocols(fs) -> tuple:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
