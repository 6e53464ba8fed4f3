"""The checkpoint protocol: temp dir, commit, `latest`, discovery, retention, verification.

Layout under --checkpoint_dir (DESIGN.md section 2)::

    latest                     one line: the name of the newest committed step dir
    step_00000020/             committed: DCP files (.metadata, __<rank>_<n>.distcp) + manifest.json
    step_00000025.tmp-<id>/    a save in progress, or abandoned by a crash

Saving step s (every rank calls `save`; rank 0 does the single-writer parts):

1. rank 0 picks a random <id> and broadcasts it; every rank writes its own shards into
   `step_XXXXXXXX.tmp-<id>/` with dcp.save (DCP writes `.metadata` last, after all ranks).
2. every rank has the size and CRC-32 of each file it wrote (computed while writing, see
   dcp_io.py); rank 0 checks them against a listing of the temp dir and writes
   `manifest.json` (name, size, CRC-32 of every file, plus step and world size) into it.
3. commit. A step dir counts as committed only if its name is `step_XXXXXXXX` and it holds
   `manifest.json`.
   - local/file://: `os.rename` of the temp dir (atomic; the manifest is already inside);
   - object stores (s3://, gs://, ...): a prefix has no atomic rename, so the files are copied
     to `step_XXXXXXXX/` one by one, `manifest.json` last: that single object PUT is the commit
     point; then the temp prefix is deleted. A crash mid-copy leaves a step dir without a
     manifest, which discovery ignores and retention removes.
4. `latest` is replaced atomically (local: temp file + fsync + os.replace; object stores: one
   PUT, atomic per object). `latest` only ever names a committed dir.
5. retention (rank 0): keep the N newest committed dirs, never the one `latest` names, and
   remove abandoned temp dirs, uncommitted step dirs and a `latest` temp file left by a crash.
6. rank 0 broadcasts success or its error, so every rank stops with the same message.

Discovery (rank 0 decides, every rank gets the same answer): trust `latest` if it names a valid
committed dir; otherwise fall back to the highest committed `step_XXXXXXXX` (parsed from the name
with an anchored pattern, never from file times) and say why.

Verification on resume. "Valid" means the manifest checks itself, names exactly the files present
with their sizes, and every file's CRC-32 matches. Reading every byte only to check it would
double the cost of a resume, so the trainer splits the work: discovery (`defer=True`) checks
everything but the CRC-32s of the shard files, then `load` checks those while DCP reads the same
files (the page cache serves both), each rank a share of the files. If that finds damage, the
trainer loads the next candidate that discovery offers (or stops, for an explicit
--checkpoint_path); the state loaded from the damaged dir is overwritten.
"""

from __future__ import annotations

import functools
import posixpath
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_train import distributed as D
from dcp_train import space
from dcp_train.errors import describe, one_line
from dcp_train import manifest as M
from dcp_train import state as S
from dcp_train.faults import fault_point
from dcp_train.lease import LeaseError, WriterLease
from dcp_train.manifest import MANIFEST, STEP_RE
from dcp_train.storage import Storage

TMP_RE = re.compile(r"^step_(\d{8})\.tmp-[0-9a-z]+$")
LATEST_TMP_RE = re.compile(r"^\.latest\.tmp-[0-9a-f]+$")  # Storage.write_atomic's, locally
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is for the user."""


@dataclass
class Found:
    path: str  # full path/URL of the step dir
    step: int
    meta: dict
    files: dict  # manifest.json's {name: {"size", "crc32"}}
    note: str = ""  # why this one was chosen, when it was not simply `latest`
    discovered: bool = True  # chosen by discovery (so it may fall back), not named by the user


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _reading(method):
    """Storage failures while reading checkpoints become one CheckpointError naming the dir."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"reading checkpoints in {self.root} failed: {_cause(e)}") from e
    return wrapper


class Checkpointer:
    def __init__(self, root: str, storage_options: dict, keep_last_n: int = -1,
                 verify: bool = True):
        try:
            self.storage = Storage(root, storage_options)
        except Exception as e:  # unknown protocol, s3fs/gcsfs not installed, a bad option
            raise CheckpointError(f"cannot open checkpoint dir {root}: {_cause(e)}") from e
        self.root = self.storage.root
        self.keep_last_n = keep_last_n
        self.verify = verify
        self.lease = WriterLease(self.storage)
        self._group = self._stager = self._executor = self._pending = None
        self._done: list[dict] = []

    def probe(self) -> None:
        """Rank 0 at start-up: fail before any training, not at the first save, when the
        storage cannot be reached, refuses the credentials or has no such bucket."""
        try:
            self.storage.probe()
        except Exception as e:  # botocore's connection errors are no OSError
            # the outermost error: botocore's names the endpoint, its cause only host:port
            raise CheckpointError(f"cannot use checkpoint dir {self.root}: {_one_line(e)}") from e

    def step_path(self, step: int) -> str:
        return self.storage.join(step_name(step))

    # ---------------------------------------------------------------- the lease
    @_reading
    def check_lease(self) -> None:
        """Rank 0, before reading any checkpoint: refuse a dir that another live run is
        writing to (its retention may delete what we are reading). Writes nothing."""
        try:
            self.lease.check()
        except LeaseError as e:
            raise CheckpointError(str(e)) from e

    def acquire_lease(self) -> None:
        """Rank 0, before anything is written: one writer per checkpoint dir (lease.py)."""
        try:
            self.lease.acquire()
        except LeaseError as e:
            raise CheckpointError(str(e)) from e
        except Exception as e:  # read-only or unwritable dir, missing permissions
            raise CheckpointError(f"cannot write to checkpoint dir {self.root}: "
                                  f"{_cause(e)}") from e

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state_dict: dict, rank: int, asynchronous: bool = False) -> None:
        """Write, commit and point `latest` at step `step`. Collective.

        Synchronous: returns once committed. Asynchronous: copies the state into reused
        staging buffers (the only part that blocks the loop), then writes and commits on a
        background thread that talks over its own gloo group (collectives of a background
        save on the training's group deadlock against FSDP's). At most one save is in flight:
        a new save first waits for the previous one. The `checkpoint` record of each committed
        save is handed out by `records()`."""
        self.wait()
        t0 = time.perf_counter()
        if not asynchronous:
            self._done.append(self._write_and_commit(step, state_dict, rank, None, t0, None))
            return
        if self._group is None:
            self._group = D.new_cpu_group()
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dcp_train-save")
        staged = self._stager.stage(state_dict)
        blocked = time.perf_counter() - t0
        self._pending = self._executor.submit(self._write_and_commit, step, staged, rank,
                                              self._group, t0, blocked)

    def poll(self) -> None:
        """Collect the save in flight if every rank has finished it. Collective (all ranks
        call it at the same point), so all ranks agree on when it is done."""
        if self._pending is not None and all(D.all_gather_objects(self._pending.done())):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed; raises its CheckpointError."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._done.append(pending.result())

    def records(self) -> list[dict]:
        """`checkpoint` records of the saves committed since the last call."""
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._stager.close()

    def _write_and_commit(self, step, state_dict, rank, group, t0, blocked) -> dict:
        final = self.step_path(step)
        problem = space.room_problem(self.root, state_dict, group)  # #13: before any write
        if problem:
            raise CheckpointError(f"saving step {step} refused: {problem}")
        tmp = D.broadcast_object(f"{final}.tmp-{secrets.token_hex(4)}" if rank == 0 else None,
                                 group=group)
        my_files, error = None, None
        try:
            writer = self.storage.dcp_writer(tmp)
            dcp.save(state_dict, storage_writer=writer, process_group=group)
            fault_point("after_shards", rank, step)
            my_files = writer.checksums  # computed while writing (dcp_io.py)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            error = f"saving step {step} to {tmp} failed: {_cause(e, self.root)}"
        # every rank learns of any rank's failure, so all stop with the same message
        gathered = D.all_gather_objects((my_files, error), group=group)
        errors = [err for _, err in gathered if err]
        if errors:
            raise CheckpointError(errors[0])
        size = None
        if rank == 0:
            try:
                size = self._commit(tmp, final, step, [files for files, _ in gathered])
            except (Exception, CheckpointException) as e:
                error = f"committing step {step} to {final} failed: {_cause(e, self.root)}"
        error = D.broadcast_object(error, group=group)
        if error:
            raise CheckpointError(error)
        seconds = time.perf_counter() - t0
        record = {"step": step, "path": final, "seconds": seconds,
                  "blocked_s": seconds if blocked is None else blocked,
                  "async": blocked is not None, "bytes": size}
        if size is not None:
            record["mb_per_s"] = size / seconds / 1e6
        return record

    def _commit(self, tmp: str, final: str, step: int, per_rank_files: list[dict]) -> int:
        """Rank 0: manifest, commit, `latest`, retention (see the module docstring)."""
        files = {n: v for d in per_rank_files for n, v in d.items()}
        on_disk = self.storage.find(tmp)  # {name: size}: a listing, no file is read
        written = {n: size for n, (size, _) in files.items()}
        if on_disk != written:
            raise CheckpointError(f"files of {tmp} differ from what was written: "
                                  f"{sorted(set(on_disk.items()) ^ set(written.items()))}")
        self.storage.write_atomic(posixpath.join(tmp, MANIFEST),
                                  M.build(step, len(per_rank_files), files))
        fault_point("before_commit", 0, step)
        if self.storage.exists(final):  # committed by a run that crashed before `latest`,
            self.storage.rm_tree(final)  # or ahead of an explicit older --resume: replace it
        self.storage.rename_dir(tmp, final, last=(MANIFEST,))
        fault_point("after_commit", 0, step)
        self.storage.write_atomic(self.storage.join(LATEST), (step_name(step) + "\n").encode(),
                                  before_replace=lambda: fault_point("mid_latest", 0, step))
        self.apply_retention(step)
        self.lease.refresh()
        return sum(s for s, _ in files.values())

    # --------------------------------------------------------------- retention
    def apply_retention(self, step: Optional[int] = None) -> list[str]:
        """Rank 0: delete old committed dirs beyond N, abandoned temps, uncommitted step dirs
        (one writer per dir, the lease: a temp that is not ours now is abandoned)."""
        committed, leftovers = self._scan()
        keep = set(committed)
        if self.keep_last_n > 0:
            keep = set(sorted(committed)[-self.keep_last_n:])
        latest = self._read_latest_name()
        removed = []
        for step, name in sorted(committed.items()):
            if step not in keep and name != latest:
                removed.append(name)
        removed += leftovers
        for i, name in enumerate(removed):
            self.storage.rm_tree(self.storage.join(name))
            if i == 0:
                fault_point("during_retention", 0, step)
        return removed

    def _scan(self) -> tuple[dict[int, str], list[str]]:
        """(committed {step: name}, names of temp dirs/files and uncommitted step dirs)."""
        committed, leftovers = {}, []
        for name in self.storage.listdir(self.root):
            if TMP_RE.match(name) or LATEST_TMP_RE.match(name):
                leftovers.append(name)
            elif m := STEP_RE.match(name):
                if self.storage.exists(self.storage.join(name, MANIFEST)):
                    committed[int(m.group(1))] = name
                else:
                    leftovers.append(name)
        return committed, leftovers

    # --------------------------------------------------------------- discovery
    def _read_latest_name(self) -> Optional[str]:
        path = self.storage.join(LATEST)
        if not self.storage.exists(path):
            return None
        return self.storage.read_bytes(path).decode(errors="replace").strip()

    @_reading
    def find_latest(self, defer: bool = False, rejected: Optional[dict] = None
                    ) -> Optional[Found]:
        """Rank 0: the checkpoint to auto-resume from, or None if there is none.
        defer: see `check`. rejected: {dir name: problem} of dirs that `load` found damaged;
        they are passed over (and named in the note)."""
        if not self.storage.exists(self.root):
            return None
        rejected = rejected or {}

        def problem_of(name: str) -> Optional[str]:
            return rejected.get(name) or self.check(self.storage.join(name), defer)

        committed, _ = self._scan()
        note, checked = "", None
        latest = self._read_latest_name()
        if latest is not None:
            if STEP_RE.match(latest) and latest in committed.values():
                problem = problem_of(latest)
                if problem is None:
                    return self._found(self.storage, self.storage.join(latest), "")
                note, checked = f"`latest` names {latest}, which is invalid ({problem})", latest
            else:
                note = f"`latest` holds {latest[:60]!r}, which is not a committed step dir"
        elif committed:
            note = "`latest` is missing"
        for step in sorted(committed, reverse=True):
            if committed[step] == checked:
                continue  # just found invalid (a full verification re-reads every byte)
            problem = problem_of(committed[step])
            if problem is None:
                return self._found(self.storage, self.storage.join(committed[step]),
                                   note + f"; falling back to {committed[step]}")
            note += f"; {committed[step]} is invalid ({problem})"
        if note:
            raise CheckpointError(f"no valid checkpoint in {self.root}: {note.lstrip('; ')}; "
                                  "move the directory away to start fresh")
        return None

    @_reading
    def fall_back(self, found: Found, rejected: dict) -> Found:
        """Rank 0: after `load` found the discovered `found` damaged, the next checkpoint that
        discovery offers in its dir; rejected: {dir name: problem} of all found damaged."""
        return Checkpointer(posixpath.dirname(found.path), self.storage.storage_options,
                            verify=self.verify).find_latest(defer=True, rejected=rejected)

    @staticmethod
    def _found(storage: Storage, path: str, note: str, discovered: bool = True) -> Found:
        meta = S.read_meta(storage.dcp_reader(path))
        return Found(path=path, step=int(meta["step"]), meta=meta,
                     files=M.read(storage, path)["files"], note=note, discovered=discovered)

    def check(self, path: str, defer: bool = False) -> Optional[str]:
        """None if `path` is a complete, intact committed checkpoint, else what is wrong.
        With verification on (the default) every file's CRC-32 is checked too; with `defer`,
        only `.metadata`'s (the small file read first), the others are left to `load`."""
        deep = self.verify and ((METADATA,) if defer else True)
        found = M.problems(self.storage, path, deep=deep)
        return "; ".join(found) if found else None

    @_reading
    def open_checkpoint(self, path: str, defer: bool = False) -> Found:
        """Rank 0: a checkpoint the user named with --checkpoint_path; errors if invalid.
        defer: see `check`."""
        path = path.rstrip("/")
        storage = Storage(path, self.storage.storage_options)
        if not storage.exists(storage.root):
            raise CheckpointError(f"--checkpoint_path {path} does not exist")
        if storage.exists(storage.join(LATEST)) and not storage.exists(storage.join(MANIFEST)):
            # a checkpoint dir was given: resolve its `latest`
            found = Checkpointer(path, self.storage.storage_options,
                                 verify=self.verify).find_latest(defer)
            if found is None:
                raise CheckpointError(f"--checkpoint_path {path} holds no committed checkpoint")
            return found
        problem = Checkpointer(path, self.storage.storage_options, verify=self.verify).check(
            storage.root, defer)
        if problem is not None:
            raise CheckpointError(unusable(path, problem))
        return self._found(storage, storage.root, "", discovered=False)

    def load(self, found: Found, model, optimizer, rank: int, world_size: int,
             with_rank_entry: bool) -> tuple[Optional[dict], Optional[str]]:
        """Collective: load model and optimizer in place from `found`, and with verification
        on check every file's CRC-32 meanwhile, each rank a share of the files on background
        threads. Returns (this rank's entry (state.load), None), or (None, what is damaged):
        then the model and optimizer hold whatever was read and the caller loads another
        checkpoint or stops. Any other failure is one CheckpointError on every rank."""
        storage = Storage(found.path, self.storage.storage_options)
        mine = {n: found.files[n] for n in _share(found.files, world_size)[rank]}
        entry, error, problems = None, None, []
        with ThreadPoolExecutor(1, thread_name_prefix="dcp_train-verify") as pool:
            checking = pool.submit(M.corrupt, storage, found.path, mine) if self.verify else None
            try:
                entry = S.load(storage.dcp_reader(found.path), model, optimizer, rank,
                               with_rank_entry)
            except (Exception, CheckpointException) as e:  # on every rank: a collective load
                error = f"loading {found.path} failed: {_cause(e)}"
            if checking is not None:
                try:
                    problems = checking.result()
                except Exception as e:
                    error = error or f"verifying {found.path} failed: {_cause(e)}"
        gathered = D.all_gather_objects((problems, error))
        problems = sorted(p for ps, _ in gathered for p in ps)
        if problems:  # damage explains a failed load too
            return None, "; ".join(problems)
        errors = [err for _, err in gathered if err]
        if errors:
            raise CheckpointError(errors[0])
        return entry, None


METADATA = ".metadata"  # DCP's small index file, read before any shard


def unusable(path: str, problem: str) -> str:
    return f"--checkpoint_path {path} is not a usable checkpoint: {problem}"


def _share(files: dict, world_size: int) -> list[list[str]]:
    """Split the files of a step dir into `world_size` lists of about equal bytes (largest
    first, each to the least loaded rank); the same answer on every rank."""
    shares, loads = [[] for _ in range(world_size)], [0] * world_size
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = loads.index(min(loads))
        shares[r].append(name)
        loads[r] += files[name]["size"]
    return shares


def _cause(e: BaseException, path: Optional[str] = None) -> str:
    """One line: the kind of an environmental failure in words (disk full, read-only,
    permission, unreachable, throttled), else the innermost cause (errors.describe)."""
    return describe(e, path)


def _one_line(e: BaseException) -> str:
    return one_line(e)
