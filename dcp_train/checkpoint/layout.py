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
valid committed dir and say why in `Found.note`. "Valid" is manifest.problems: the manifest
checks itself and names exactly the files present with their sizes, and (verification on) every
file's checksum matches. With `defer=True` only `.metadata`'s is checked; the shard files
are checked while they are loaded (restore.py), where damage makes the trainer fall back.
Nothing here writes.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.atomic import TEMP_RE
from dcp_train.checkpoint.io.manifest import MANIFEST, STEP_RE
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.state import read_meta
from dcp_train.errors import CheckpointError, ConfigError, describe, one_line

LATEST = "latest"
METADATA = ".metadata"  # DCP's small index file, read before any shard
TMP_RE = re.compile(r"^step_(\d{8})\.tmp-[0-9a-z]+$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Found:
    """A committed checkpoint chosen for resuming."""

    path: str  # full path/URL of the step dir
    step: int
    meta: dict  # the checkpoint's `meta` entry (components.Progress)
    files: dict  # manifest.json's {name: {"size", <checksum>}} (manifest.digest)
    note: str = ""  # why this one was chosen, when it was not simply `latest`
    discovered: bool = True  # chosen by discovery (so it may fall back), not named by the user

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
    def __init__(self, url: str, storage_options: Optional[dict] = None, verify: bool = True):
        try:
            self.storage = Storage(url, storage_options)
        except Exception as e:  # unknown protocol, s3fs/gcsfs not installed, a bad option
            raise CheckpointError(f"cannot open checkpoint dir {url}: {describe(e)}") from e
        self.root = self.storage.root
        self.verify = verify

    def step_path(self, step: int) -> str:
        return self.storage.join(step_name(step))

    def view(self, url: str) -> "CheckpointDir":
        """The same kind of view of another directory, with the same options."""
        return CheckpointDir(url, self.storage.storage_options, self.verify)

    def probe(self) -> None:
        """Fail now, not at the first save, when the storage cannot be reached, refuses the
        credentials or has no such bucket."""
        try:
            self.storage.probe()
        except Exception as e:  # botocore's connection errors are no OSError
            # the outermost error: botocore's names the endpoint, its cause only host:port
            raise CheckpointError(f"cannot use checkpoint dir {self.root}: {one_line(e)}") from e

    # ------------------------------------------------------------------ what is there
    def scan(self) -> tuple[dict[int, str], list[str]]:
        """(committed {step: name}, names of leftovers: temp dirs, uncommitted step dirs and
        `latest` temp files). No file is read."""
        committed, leftovers = {}, []
        for name in self.storage.listdir(self.root):
            if TMP_RE.match(name) or ((m := TEMP_RE.match(name)) and m.group(1) == LATEST):
                leftovers.append(name)
            elif m := STEP_RE.match(name):
                if self.storage.exists(self.storage.join(name, MANIFEST)):
                    committed[int(m.group(1))] = name
                else:
                    leftovers.append(name)
        return committed, leftovers

    def latest_name(self) -> Optional[str]:
        """What `latest` holds (stripped), or None if there is no `latest`."""
        path = self.storage.join(LATEST)
        if not self.storage.exists(path):
            return None
        return self.storage.read_bytes(path).decode(errors="replace").strip()

    def check(self, path: str, defer: bool = False) -> Optional[str]:
        """None if `path` is a complete, intact committed checkpoint, else what is wrong.
        With verification on (the default) every file's checksum is checked too; with `defer`,
        only `.metadata`'s (the small file read first), the others are left to the load."""
        deep = self.verify and ((METADATA,) if defer else True)
        found = M.problems(self.storage, path, deep=deep)
        return "; ".join(found) if found else None

    def found(self, path: str, note: str = "", discovered: bool = True) -> Found:
        meta = read_meta(self.storage.dcp_reader(path))
        return Found(path=path, step=int(meta["step"]), meta=meta,
                     files=M.read(self.storage, path)["files"], note=note, discovered=discovered)

    # -------------------------------------------------------------------- discovery
    @reading
    def find_latest(self, defer: bool = False, rejected: Optional[dict] = None
                    ) -> Optional[Found]:
        """The checkpoint to auto-resume from, or None if there is none. defer: see `check`.
        rejected: {dir name: problem} of dirs found damaged while loading; passed over (and
        named in the note)."""
        if not self.storage.exists(self.root):
            return None
        rejected = rejected or {}
        committed, _ = self.scan()
        note, checked = "", None
        latest = self.latest_name()
        if latest is not None:
            if STEP_RE.match(latest) and latest in committed.values():
                problem = rejected.get(latest) or self.check(self.storage.join(latest), defer)
                if problem is None:
                    return self.found(self.storage.join(latest))
                note, checked = f"`latest` names {latest}, which is invalid ({problem})", latest
            else:
                note = f"`latest` holds {latest[:60]!r}, which is not a committed step dir"
        elif committed:
            note = "`latest` is missing"
        for step in sorted(committed, reverse=True):
            name = committed[step]
            if name == checked:
                continue  # just found invalid (a full verification re-reads every byte)
            problem = rejected.get(name) or self.check(self.storage.join(name), defer)
            if problem is None:
                return self.found(self.storage.join(name), note + f"; falling back to {name}")
            note += f"; {name} is invalid ({problem})"
        if note:
            raise CheckpointError(f"no valid checkpoint in {self.root}: {note.lstrip('; ')}; "
                                  "move the directory away to start fresh")
        return None

    def fall_back(self, found: Found, rejected: dict) -> Found:
        """After the load found the discovered `found` damaged, the next checkpoint that
        discovery offers in its dir; rejected: {dir name: problem} of all found damaged."""
        return self.view(posixpath.dirname(found.path)).find_latest(defer=True,
                                                                     rejected=rejected)

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
        problem = other.check(target, defer)
        if problem is not None:
            raise CheckpointError(unusable(target if latest else path, problem))
        return other.found(target, discovered=False)

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
