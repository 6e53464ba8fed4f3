"""The save protocol: write, manifest, commit, `latest`, retention. Read top to bottom.

Saving step s (every rank calls `save`; rank 0 does the single-writer parts). Every failure is
agreed on (distributed.agree), so all ranks stop with the same CheckpointError.

1. rank 0 picks the dir the save writes into:
   - local/file://: a new temp dir `step_XXXXXXXX.tmp-<id>/`, renamed at the commit;
   - object stores (s3://, gs://, ...): the step dir `step_XXXXXXXX/` itself (a prefix has no
     atomic rename, and copying every object would move each byte twice). Files left there by
     a crashed attempt at the same step are deleted first (a committed dir being written over
     loses its manifest.json first, so it stops counting as committed before anything else
     goes). Whether there are any is known from the last listing of the dir (discovery's,
     or the previous save's retention; one writer per dir), not asked again.
   Every rank writes its own shards into it with dcp.save (DCP writes `.metadata` last;
   on object stores under its final name, dcp_io.py).
2. every rank has the size and checksum of each file it wrote (computed while writing, see
   dcp_io.py); locally rank 0 checks the sizes against a listing of the dir (no file is read
   again). On an object store an upload that returned is durable at that size, so no listing
   is asked for.
3. commit: rank 0 writes `manifest.json` (name, size, checksum of every file, step, world
   size; manifest.py).
   A step dir counts as committed only if its name is `step_XXXXXXXX` and it holds one.
   - local: the manifest goes into the temp dir, which is then renamed (atomic);
   - object stores: the manifest PUT, after every other file is durable, is the commit point.
     A crash before it leaves a step dir without a manifest, which discovery never resumes
     from and retention removes.
4. `latest` is replaced atomically (atomic.py) and only ever names a committed dir.
5. retention (rank 0): keep the N newest committed dirs, never the one `latest` names, and
   remove leftovers: abandoned temp dirs, step dirs without a manifest, a `latest` temp file.
   A dir is deleted manifest first, so a crash midway never leaves a committed dir with
   files missing.
   One writer per dir (the lease, lease.py) and one save at a time: a leftover now is
   abandoned.

The node-local tier (tiers/local.py) runs the same steps on its own directory through the same
methods (`check_room`, `target_dir`, `write`, `commit`): only who commits differs (each node's
lowest rank, over its node's files) and what it adds before the manifest (`tier.json`).
With --async_checkpoint its saves run in the save process too (`child`).

Requests on an object store, per save: one PUT per file (data files, `.metadata`,
manifest.json, `latest`; a large file is a multipart upload), one LIST for retention, and for
each dir retention removes a DELETE of its manifest, a LIST and a batched DELETE. Every
rank's requests are counted (store/requests.py) and summed through the gather of step 2: the
`requests` of the `checkpoint` record.

Store outages (ride_out.py): on a store, a save is three collective phases (the dir, the
writes, the commit with `latest` and retention), each run again after a transient store failure
(a refusal or a timeout, agreed by every rank) until it succeeds, or until --store_retry_budget
(refusals) or --stall_timeout (silence) has passed: then StoreUnavailable (exit 69), the last
committed checkpoint intact. Running a phase again is safe: the same bytes under the same names,
the same manifest, `latest` and retention idempotent.

Asynchronous saves run steps 1-5 in a save process per rank (async_save/): the training
process only copies the state into reused shared-memory buffers, overlapped with the next
step, and the next optimizer step waits for that copy if it is not done. At most one save is in
flight: a new save first collects the previous one.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import time
from typing import Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_train import distributed as D
from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io import space
from dcp_train.store import requests as store_requests
from dcp_train.store.atomic import fsync_dir
from dcp_train.checkpoint.io.names import LATEST, MANIFEST, step_name
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.ride_out import Patience, agreed_phase
from dcp_train.errors import CheckpointError, describe
from dcp_train.job import faults
from dcp_train.job.faults import fault_point


class Checkpointer:
    """Writes checkpoints of step s into `directory` (a CheckpointDir) and keeps the newest
    `keep_last_n` (-1: all). `on_commit()` runs on rank 0 after each synchronous commit (the
    lease's heartbeat; the manager refreshes the lease at every step anyway, which covers
    asynchronous saves). `save_process(directory, keep_last_n, rank, world_size)` starts this
    rank's save process for asynchronous saves (async_save.save_process.SaveProcess, passed in
    by the manager: the save process runs this module, which therefore never imports it).
    `words(text)` rewrites the advice of an error message for this target's own flags (the
    local tier's). `child`: a picklable callable that builds, in the save process, the saver
    it runs (default None: this protocol over the same dir; the local tier passes its own).
    `patience`: how long a save's phases ride out a store outage (ride_out.py; the manager
    sets it from --store_retry_budget and --stall_timeout; default: no retry)."""

    def __init__(self, directory: CheckpointDir, keep_last_n: int = -1, on_commit=None,
                 save_process=None, words=None, child=None):
        self.dir, self.storage = directory, directory.storage
        self.keep_last_n = keep_last_n
        self.on_commit = on_commit
        self._start_saver = save_process
        self.child = child
        self.words = words if words is not None else (lambda text: text)
        self._saver = None
        self._done: list[dict] = []
        self._gather_s: dict[int, float] = {}  # step -> seconds spent gathering its state
        self.patience = Patience()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state_dict: dict, rank: int, world_size: int,
             asynchronous: bool = False, options: Optional[dict] = None,
             t0: Optional[float] = None) -> None:
        """Write, commit and point `latest` at step `step`. Collective. Synchronous: returns
        once committed. Asynchronous: returns at once; the tensors of `state_dict` must not
        change before `staged()` returns (see save_process.py); options: keyword arguments
        of the save process's write_and_commit (the local tier's). The `checkpoint` record of
        each committed save is handed out by `records()`. t0 (time.perf_counter): when the
        save was asked for, before its state dicts were gathered (the manager's); default
        now. `seconds` and `blocked_s` run from it."""
        t0 = self.asked(step, t0)
        self.wait()
        if not asynchronous:
            self.finished(self.write_and_commit(step, state_dict, rank, t0))
            return
        self.start_save_process(rank, world_size)
        self._saver.submit(step, state_dict, t0,
                           options if options is not None else {"patience": self.patience})

    def asked(self, step: int, t0: Optional[float] = None) -> float:
        """The save of `step` was asked for at t0 (perf_counter, before its state dicts were
        gathered; default now): its record's `gather_s` is the time from t0 to this call.
        Returns t0."""
        now = time.perf_counter()
        t0 = now if t0 is None else t0
        self._gather_s[step] = now - t0
        return t0

    def finished(self, record: dict) -> None:
        """Hand out (`records()`) the record of a synchronous save: it blocked throughout."""
        self._done.append({**record, "blocked_s": record["seconds"], "async": False})

    def start_save_process(self, rank: int, world_size: int) -> None:
        """Start this rank's save process for asynchronous saves, if not yet. Collective."""
        if self._saver is None:
            if self._start_saver is None:
                raise ValueError("asynchronous saves need Checkpointer(..., save_process=...)")
            self._saver = self._start_saver(self.dir, self.keep_last_n, rank, world_size,
                                            build=self.child)

    def staged(self) -> None:
        """Block until the save in flight has its own copy of the state."""
        if self._saver is not None:
            self._saver.staged()

    def poll(self) -> None:
        """Collect the save in flight if every rank has finished it. Collective (all ranks
        call it at the same point), so all ranks agree on when it is done."""
        if self._saver is not None and self._saver.busy and all(
                D.agree(self._saver.done, every_rank=True)):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed; raises its CheckpointError."""
        if self._saver is not None and self._saver.busy:
            self._done.append(self._saver.result())

    def records(self) -> list[dict]:
        """`checkpoint` records of the saves committed since the last call."""
        done, self._done = self._done, []
        return [{**r, "gather_s": self._gather_s.pop(r["step"], None)} for r in done]

    def close(self) -> None:
        self.wait()
        if self._saver is not None:
            self._saver.close()
            self._saver = None

    def write_and_commit(self, step: int, state_dict: dict, rank: int, t0: float,
                         patience: Optional[Patience] = None) -> dict:
        """Steps 1-5 of the module docstring over the default group; the `checkpoint` record
        (t0: when the save was asked for, time.perf_counter). Each of its three collective
        phases (the dir, the writes, the commit with `latest` and retention) is run again
        after a transient store failure within `patience` (default self.patience; ride_out.py):
        the writes put the same bytes under the same names, the commit rewrites the same
        manifest, `latest` and retention are idempotent."""
        faults.at_step(step)
        patience = patience if patience is not None else self.patience
        final = self.dir.step_path(step)
        self.check_room(step, state_dict)

        def commit() -> int:
            try:
                return self.commit(target, final, step, per_rank_files)
            except (Exception, CheckpointException) as e:
                raise CheckpointError(f"committing step {step} to {final} failed: "
                                      f"{describe(e, self.dir.root)}") from e

        def phase(name, fn, every_rank=False):
            return agreed_phase(fn, patience, self.dir.root, f"the save of step {step} ({name})",
                                every_rank)

        mark = store_requests.snapshot()
        target = phase("its dir", lambda: self.target_dir(final))
        gathered = phase("write", lambda: (self.write(step, state_dict, rank, target),
                                           store_requests.since(mark)), every_rank=True)
        per_rank_files = [files for files, _ in gathered]
        size = phase("commit", commit)
        seconds = time.perf_counter() - t0
        requests = store_requests.total(store_requests.since(mark),
                                        *[counts for _, counts in gathered[1:]])
        return {"step": step, "path": final, "seconds": seconds, "bytes": size,
                "mb_per_s": size / seconds / 1e6, "requests": requests}

    def check_room(self, step: int, state_dict: dict, what: str = "saving step") -> None:
        """Every rank, before any write: refuse a save the free space cannot hold."""
        problem = space.room_problem(self.dir.root, state_dict)
        if problem:
            raise CheckpointError(self.words(f"{what} {step} refused: {problem}"))

    def write(self, step: int, state_dict: dict, rank: int, target: str) -> dict:
        """Every rank: its DCP files of `state_dict` into `target` (step 1); returns their
        {name: [size, crc32]}, computed while writing (dcp_io.py)."""
        try:
            if self.storage.is_local:
                os.makedirs(target, exist_ok=True)
            writer = self.storage.dcp_writer(target)
            dcp.save(state_dict, storage_writer=writer, planner=self.storage.dcp_planner())
            fault_point("after_shards", rank, step)
            return writer.checksums
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise CheckpointError(self.words(f"saving step {step} to {target} failed: "
                                             f"{describe(e, self.dir.root)}")) from e

    def target_dir(self, final: str) -> str:
        """Rank 0: the dir this save writes into (step 1 of the module docstring)."""
        if self.storage.is_local:
            return f"{final}.tmp-{secrets.token_hex(4)}"
        if self.dir.seen is None:
            self.dir.names()  # the first save of a save process: one listing
        if posixpath.basename(final) in self.dir.seen:
            self.remove(final)
        return final

    def commit(self, target: str, final: str, step: int, per_rank_files: list[dict],
               rank: int = 0, expected: Optional[dict] = None, extra: Optional[dict] = None,
               protect=None, checksum: str = C.CHECKSUM) -> int:
        """The committing rank (rank 0; on the local tier each node's lowest, `rank`):
        check the listing, manifest, commit, `latest`, retention (steps 2-5). per_rank_files:
        every rank's {file: [size, hex digest of `checksum`]}; expected: {name: size} the
        listing must show (default: every file written); extra: {name: bytes} written before
        the manifest; protect: apply_retention's. Returns the bytes."""
        files = {n: v for d in per_rank_files for n, v in d.items()}
        if self.storage.is_local:  # an object store's returned upload is durable at its size
            on_disk = self.storage.find(target)  # {name: size}: a listing, no file is read
            if expected is None:
                expected = {n: size for n, (size, _) in files.items()}
            if on_disk != expected:
                raise CheckpointError(f"files of {target} differ from what was written: "
                                      f"{sorted(set(on_disk.items()) ^ set(expected.items()))}")
        for name, data in (extra or {}).items():
            self.storage.write_atomic(posixpath.join(target, name), data)
        manifest = M.build(step, len(per_rank_files), files, checksum)
        if self.storage.is_local:
            self.storage.write_atomic(posixpath.join(target, MANIFEST), manifest)
            fault_point("before_commit", rank, step)
            if self.storage.exists(final):  # committed by a run that crashed before `latest`,
                self.remove(final)  # or ahead of an explicit older --resume
            self.storage.rename_dir(target, final)
        else:
            fault_point("before_commit", rank, step)
            self.storage.write_atomic(posixpath.join(final, MANIFEST), manifest)  # the commit
        self.dir.committed(posixpath.basename(final))
        fault_point("after_commit", rank, step)
        self.advance(step, protect)
        return sum(s for s, _ in files.values())

    def advance(self, step: int, protect=None) -> None:
        """After step `step` is committed: `latest`, retention, on_commit."""
        self.storage.write_atomic(self.storage.join(LATEST), (step_name(step) + "\n").encode())
        self.apply_retention(step, protect, latest=step_name(step))
        if self.on_commit is not None:
            self.on_commit()

    # --------------------------------------------------------------- retention
    def apply_retention(self, step: Optional[int] = None, protect=None,
                        latest: Optional[str] = None) -> list[str]:
        """Rank 0: delete old committed dirs beyond N (never the one `latest` names, nor one
        for which `protect(step, name)` is true) and leftovers; returns the names removed.
        latest: what `latest` holds, if the caller just wrote it (else it is read)."""
        committed, leftovers = self.dir.scan(fresh=True)
        keep = set(committed)
        if self.keep_last_n > 0:
            keep = set(sorted(committed)[-self.keep_last_n:])
        if latest is None:
            latest = self.dir.latest_name()
        removed = [name for s, name in sorted(committed.items()) if s not in keep
                   and name != latest and not (protect is not None and protect(s, name))]
        removed += leftovers
        for i, name in enumerate(removed):
            self.remove(self.storage.join(name))
            if i == 0:
                fault_point("during_retention", 0, step)
        return removed

    def remove(self, path: str) -> None:
        """Delete a step dir (or leftover), manifest.json first: a crash midway leaves a dir
        that no longer counts as committed, which the next retention removes, never a
        committed dir with files missing."""
        self.storage.rm_file(posixpath.join(path, MANIFEST))
        if self.storage.is_local and self.storage.exists(path):
            fsync_dir(path)  # the manifest's removal is durable before any other file goes
        fault_point("mid_removal", 0)
        self.storage.rm_tree(path)
        self.dir.committed(posixpath.basename(path.rstrip("/")), False)
