"""A read-only view of a checkpoint directory: what is committed, what `latest` names, whether
a step dir is intact, which one to resume from, what a path a user typed means. The trainer
(discovery, --checkpoint_path) and dcp-ckpt both use it, so each rule is written once.

Layout (docs/design.md, "Checkpoint directory")::

    latest                     one line: the name of the newest committed step dir
    writer.lease               which run writes here (lease.py)
    step_00000020/             committed: DCP files (.metadata, __<rank>_<n>.distcp) + manifest.json
    step_00000025.tmp-<id>/    a save in progress, or abandoned by a crash (local dirs)
    .latest.tmp-<8 hex>        `latest`'s temp file, abandoned by a crash (atomic.py)

A step dir counts as committed only if its name is `step_XXXXXXXX` and it holds manifest.json;
the step comes from the name (an anchored pattern), never from file times.

Discovery: trust `latest` if it names a valid committed dir; otherwise fall back to the highest
valid committed dir and say why in `Found.note`. Its requests on an object store: one listing
of the dir (shared with the probe), a GET of `latest`, then for the dir it names a GET of
manifest.json, a listing of the step dir (sizes) and a GET of `.metadata`; the caller (rank 0)
hands `.metadata`'s bytes on in `Found`, so no other rank reads it again. "Valid" is manifest.problems: the manifest
checks itself and names exactly the files present with their sizes, and (verification on) every
file's checksum matches. With `defer=True` only `.metadata`'s is checked; the shard files
are checked while they are loaded (restore.py), where damage makes the trainer fall back.
Nothing here writes.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from typing import Optional

from fsspec.core import split_protocol
from torch.distributed.checkpoint.api import CheckpointException

from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.names import (LATEST, MANIFEST, METADATA, STEP_RE, TEMP_RE, TMP_RE,
                                            step_name)
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.state import read_meta
from dcp_train.errors import CheckpointError, ConfigError, describe, one_line
from dcp_train.store.options import DEFAULT_STALL_S



@dataclass
class Found:
    """A committed checkpoint chosen for resuming."""

    path: str  # full path/URL of the step dir
    step: int
    meta: dict  # the checkpoint's `meta` entry (state.Progress)
    files: dict  # manifest.json's {name: {"size", <checksum>}} (manifest.digest)
    note: str = ""  # why this one was chosen, when it was not simply `latest`
    discovered: bool = True  # chosen by discovery (so it may fall back), not named by the user
    metadata: Optional[bytes] = None  # `.metadata`'s bytes, checked against the manifest
    newer: tuple = ()  # committed steps of --checkpoint_dir newer than this one (newer.py)

    @property
    def sizes(self) -> dict[str, int]:
        return {n: v["size"] for n, v in self.files.items()}

    @property
    def checksum(self) -> str:
        """The checksum manifest.json's entries hold (checksum.py)."""
        return M.checksum_of(self.files)


def reading(method):
    """Storage failures while reading checkpoints become one CheckpointError naming the dir."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (CheckpointError, ConfigError):  # already said for the user
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"reading checkpoints in {self.root} failed: "
                                  f"{describe(e, self.root)}") from e
    return wrapper


def unusable(path: str, problem: str) -> str:
    return f"--checkpoint_path {path} is not a usable checkpoint: {problem}"


class CheckpointDir:
    def __init__(self, url: str, storage_options: Optional[dict] = None, verify: bool = True,
                 stall_timeout: float = DEFAULT_STALL_S):
        """storage_options: the user's (--storage_options); Storage merges the request
        timeouts that follow stall_timeout (--stall_timeout) under them."""
        try:
            self.storage = Storage(url, storage_options, stall_timeout)
        except Exception as e:  # unknown protocol, s3fs/gcsfs not installed, a bad option
            raise CheckpointError(f"cannot open checkpoint dir {url}: {describe(e)}") from e
        self.root = self.storage.root
        self.verify = verify
        self._listing = None  # the probe's listing of root, until discovery uses it
        self.seen: Optional[set] = None  # names under root at the last listing, kept current
        self._committed: set[str] = set()  # step dirs seen committed (their manifest read)

    def step_path(self, step: int) -> str:
        return self.storage.join(step_name(step))

    def view(self, url: str) -> "CheckpointDir":
        """The same kind of view of another directory, with the same options."""
        return CheckpointDir(url, self.storage.storage_options, self.verify)

    def storage_for(self, path: str) -> Storage:
        """This view's Storage where it can read `path` (every path under this dir, and a
        --checkpoint_path on the same filesystem: its methods take full paths), else the
        Storage of a view of `path` (a --checkpoint_path on another store)."""
        protocol = split_protocol(path)[0] or "file"
        ours = self.storage.fs.protocol
        if protocol in ((ours,) if isinstance(ours, str) else ours):
            return self.storage
        return self.view(path).storage

    def probe(self) -> None:
        """Fail now, not at the first save, when the storage cannot be reached, refuses the
        credentials or has no such bucket."""
        try:
            self._listing = self.storage.probe()
        except Exception as e:  # botocore's connection errors are no OSError
            # the outermost error: botocore's names the endpoint, its cause only host:port
            raise CheckpointError(f"cannot use checkpoint dir {self.root}: {one_line(e)}") from e

    # ------------------------------------------------------------------ what is there
    def names(self, fresh: bool = False) -> dict:
        """{name: size or None} directly under root: the probe's listing if not used yet
        (and not `fresh`), else a new one (object stores: one LIST request)."""
        listing, self._listing = self._listing, None
        if listing is None or fresh:
            listing = self.storage.listing(self.root)
        self.seen = set(listing)
        return listing

    def committed(self, name: str, yes: bool = True) -> None:
        """Tell this view that step dir `name` was just committed (or removed, yes=False), so
        scan() need not look for its manifest and `seen` stays current."""
        (self._committed.add if yes else self._committed.discard)(name)
        if self.seen is not None:
            (self.seen.add if yes else self.seen.discard)(name)

    def scan(self, fresh: bool = False) -> tuple[dict[int, str], list[str]]:
        """(committed {step: name}, names of leftovers: temp dirs, uncommitted step dirs and
        `latest` temp files). No file is read: a listing (see `names`) and a look for the
        manifest of each step dir not known committed (a HEAD)."""
        committed, leftovers = {}, []
        for name in sorted(self.names(fresh)):
            if TMP_RE.match(name) or ((m := TEMP_RE.match(name)) and m.group(1) == LATEST):
                leftovers.append(name)
            elif m := STEP_RE.match(name):
                if name in self._committed or self.storage.exists(
                        self.storage.join(name, MANIFEST)):
                    committed[int(m.group(1))] = name
                    self._committed.add(name)
                else:
                    leftovers.append(name)
        return committed, leftovers

    def latest_name(self) -> Optional[str]:
        """What `latest` holds (stripped), or None if there is no `latest` (one GET)."""
        data = self.storage.read_optional(self.storage.join(LATEST))
        return None if data is None else data.decode(errors="replace").strip()

    def check(self, path: str, defer: bool = False) -> Optional[str]:
        """None if `path` is a complete, intact committed checkpoint, else what is wrong.
        With verification on (the default) every file's checksum is checked too; with `defer`,
        only `.metadata`'s (the small file read first), the others are left to the load."""
        try:
            problem, _, _ = self.examine(path, defer)
        except M.ManifestError as e:
            return str(e)
        return problem

    def examine(self, path: str, defer: bool) -> tuple[Optional[str], dict, Optional[bytes]]:
        """(what is wrong or None, the manifest, `.metadata`'s bytes once checked) of step dir
        `path` (see `check`); M.NotCommitted if it has no manifest. Object stores: a GET of
        the manifest, a listing of the dir, and with `defer` a GET of `.metadata`."""
        manifest = M.read(self.storage, path)
        if not defer:
            found = M.problems(self.storage, path, deep=self.verify, manifest=manifest)
            return ("; ".join(found) if found else None), manifest, None
        found = M.problems(self.storage, path, deep=False, manifest=manifest)
        if found:
            return "; ".join(found), manifest, None
        entry = manifest["files"][METADATA]
        data = self.storage.read_bytes(posixpath.join(path, METADATA))
        checksum = M.digest(entry)[0]
        value = C.hexdigest(C.update(checksum, 0, data))
        if self.verify and (len(data) != entry["size"] or value != M.digest(entry)[1]):
            return M.corrupt_line(METADATA, value, entry), manifest, None
        return None, manifest, data

    def found(self, path: str, note: str = "", discovered: bool = True,
              manifest: Optional[dict] = None, metadata: Optional[bytes] = None) -> Found:
        """The Found of committed step dir `path` (its manifest and `.metadata`'s bytes, if
        already read, spare their requests); reads the `meta` entry (a ranged GET)."""
        files = (manifest or M.read(self.storage, path))["files"]
        reader = self.storage.dcp_reader(path, {n: v["size"] for n, v in files.items()},
                                         metadata)
        meta = read_meta(reader)
        self._committed.add(posixpath.basename(path.rstrip("/")))
        return Found(path=path, step=int(meta["step"]), meta=meta, files=files, note=note,
                     discovered=discovered, metadata=metadata)

    def _found(self, ok: tuple, note: str = "") -> Found:
        path, manifest, metadata = ok
        return self.found(path, note, manifest=manifest, metadata=metadata)

    def _try(self, name: str, defer: bool, rejected: dict):
        """(problem, Found) of step dir `name` for discovery; (None, None) if uncommitted."""
        if name in rejected:
            return rejected[name], None
        path = self.storage.join(name)
        try:
            problem, manifest, metadata = self.examine(path, defer)
        except M.NotCommitted:
            return None, None
        except M.ManifestError as e:
            return str(e), None
        return problem, (None if problem else (path, manifest, metadata))

    # -------------------------------------------------------------------- discovery
    @reading
    def find_latest(self, defer: bool = False, rejected: Optional[dict] = None
                    ) -> Optional[Found]:
        """The checkpoint to auto-resume from, or None if there is none. defer: see `check`.
        rejected: {dir name: problem} of dirs found damaged while loading; passed over (and
        named in the note). Requests: see the module docstring; a step dir is looked at only
        when `latest` does not lead to a valid one."""
        rejected = rejected or {}
        names = self.names()
        steps = {int(m.group(1)): n for n in names if (m := STEP_RE.match(n))}
        note, checked = "", None
        latest = self.latest_name() if LATEST in names else None
        if latest is not None:
            problem, ok = (self._try(latest, defer, rejected) if latest in steps.values()
                           else (None, None))
            if ok:
                return self._found(ok)
            checked = latest
            if problem is not None:
                note = f"`latest` names {latest}, which is invalid ({problem})"
            else:
                note = f"`latest` holds {latest[:60]!r}, which is not a committed step dir"
        for step in sorted(steps, reverse=True):
            name = steps[step]
            if name == checked:
                continue  # just found invalid (a full verification re-reads every byte)
            problem, ok = self._try(name, defer, rejected)
            if problem is None and ok is None:
                continue  # never committed: a leftover, not a checkpoint
            note = note or "`latest` is missing"
            if ok:
                return self._found(ok, note + f"; falling back to {name}")
            note += f"; {name} is invalid ({problem})"
        if note:
            raise CheckpointError(f"no valid checkpoint in {self.root}: {note.lstrip('; ')}; "
                                  "move the directory away to start fresh")
        return None

    @reading
    def open(self, path: str, defer: bool = False) -> Found:
        """A checkpoint the user named (--checkpoint_path): a step dir, or a checkpoint dir,
        which means exactly the step dir its `latest` names. Either must be valid: anything
        else is an error, never a fall-back to another step. defer: see `check`."""
        path = path.rstrip("/")
        other = self.view(path)
        storage = other.storage
        if not storage.exists(storage.root):
            raise CheckpointError(f"--checkpoint_path {path} does not exist")
        target = storage.root
        latest = None if storage.exists(storage.join(MANIFEST)) else other.latest_name()
        if latest is not None:  # a checkpoint dir: the step its `latest` names, no other
            target = storage.join(latest)
            if not STEP_RE.match(latest) or not storage.exists(target):
                what = "does not exist" if STEP_RE.match(latest) else "is not a step dir name"
                raise CheckpointError(unusable(path, f"its `latest` names {latest[:60]!r}, "
                                      f"which {what}; name a committed step dir instead "
                                      "(--auto_resume would pick the newest valid one)"))
        try:
            problem, manifest, metadata = other.examine(target, defer)
        except M.ManifestError as e:
            problem = str(e)
        if problem is not None:
            raise CheckpointError(unusable(target if latest else path, problem))
        return other.found(target, discovered=False, manifest=manifest, metadata=metadata)

    def resolve(self) -> str:
        """For tools: the step dir this view's root names: itself (a step dir, a temp dir or
        any dir with a manifest), or the one its `latest` names. Checks nothing else."""
        root, storage = self.root, self.storage
        name = posixpath.basename(root.rstrip("/"))
        if STEP_RE.match(name) or TMP_RE.match(name) or storage.exists(storage.join(MANIFEST)):
            if not storage.exists(root):
                raise CheckpointError(f"{root} does not exist")
            return root
        latest = self.latest_name()
        if latest is not None:
            if not STEP_RE.match(latest):
                raise CheckpointError(f"{storage.join(LATEST)} holds {latest[:60]!r}, not a "
                                      "step dir name")
            return storage.join(latest)
        if not storage.exists(root):
            raise CheckpointError(f"{root} does not exist")
        raise CheckpointError(f"{root} is neither a step dir nor a checkpoint dir with a "
                              "`latest` file")
