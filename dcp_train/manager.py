"""The checkpoint manager: the trainer's only way to checkpoints, in three calls.

    ckpt = CheckpointManager(cfg, info, metrics, progress, shared=[...], entry=RankEntry(...))
    ckpt.resume()                                  # once, before the first step
    ckpt.step(step, last=..., stopping=...)        # after every step: saves when due
    ckpt.close()                                   # at the end: the last step is committed

It owns the policy (when to save, sync or async, retention, which checkpoint to resume from)
and the writer lease; the components (components.py) own what is saved and how it comes back.

resume(), in order (every decision taken on rank 0 and agreed on, distributed.agree):
1. probe the storage, refuse a dir another live run writes (the lease, read only);
2. pick the checkpoint: --resume names one (--checkpoint_path), --auto_resume discovers the
   newest valid one (checkpoint_dir.py); without either a dir that holds committed
   checkpoints is refused (a fresh start would overwrite that run), an empty one starts fresh;
3. check that this run can continue it: a format this code reads, and the same data, seed,
   sequence length, batch geometry and model (runcheck.py); what may change (LR, intervals,
   ...) is reported as WARNING lines and in the `resume` record;
4. load every component, verifying the files meanwhile (restore.py); damage makes a discovered
   checkpoint fall back to the next one, and is an error for one the user named;
5. take the writer lease: nothing is written to --checkpoint_dir before this point; with
   --async_checkpoint, start the save process (save_process.py);
6. this rank's entry is restored at the same world size; otherwise, and at a fresh start, its
   parts start fresh (loader at the global position, RNG seeded from (seed, step, rank));
7. log the `resume` record.
"""

from __future__ import annotations

import posixpath
import time

from dcp_train import deterministic
from dcp_train import distributed as D
from dcp_train import restore
from dcp_train.checkpoint import Checkpointer
from dcp_train.checkpoint_dir import CheckpointDir, Found, reading, unusable
from dcp_train.components import OptimizerState, check_format
from dcp_train.config import ConfigError
from dcp_train.errors import CheckpointError, describe
from dcp_train.lease import LeaseError, WriterLease
from dcp_train.metrics import resident_mb
from dcp_train.runcheck import change_lines, compare_run, end_note, mismatch_message


def due(interval: int, step: int, last: bool) -> bool:
    return interval > 0 and (step % interval == 0 or last)


class CheckpointManager:
    def __init__(self, cfg, info, metrics, progress, shared: list, entry):
        self.cfg, self.info, self.metrics = cfg, info, metrics
        self.progress, self.shared, self.entry = progress, shared, entry
        self.dir = CheckpointDir(cfg.checkpoint_dir, cfg.storage_options_dict,
                                 verify=cfg.verify_checkpoint)
        self.lease = WriterLease(self.dir.storage)
        self.writer = Checkpointer(self.dir, cfg.keep_last_n_checkpoints,
                                   on_commit=self.lease.refresh)
        for component in shared:  # an async save copies the state before it changes
            if isinstance(component, OptimizerState):
                component.optimizer.register_step_pre_hook(lambda *_: self.writer.staged())
        self.committed_step = None  # the step whose state is committed in our dir
        self.changes = {}  # {flag: [saved, now]} of what this resume changed (runcheck.py)

    @property
    def root(self) -> str:
        return self.dir.root

    # ----------------------------------------------------------------------- resume
    def resume(self) -> None:
        t0 = time.perf_counter()
        found = D.agree(self._choose)
        if found is not None:
            self._check(found)
            found = self._load(found)
        D.agree(self._acquire_lease)
        if self.cfg.async_checkpoint:  # its start-up (seconds) overlaps the first steps
            self.writer.start_save_process(self.info.rank, self.info.world_size)
        if found is None or not self._same_world(found):
            self.entry.fresh()
        if found is None:
            if self.cfg.auto_resume:
                self.metrics.say(f"no checkpoint in {self.dir.root}: starting fresh at step 0")
            return
        if found.path == self.dir.step_path(found.step):
            self.committed_step = found.step
        self._log_resume(found, time.perf_counter() - t0)

    @reading
    def _choose(self) -> Found | None:
        """Rank 0: the checkpoint to resume from (its shard CRC-32s are checked while
        loading), or None."""
        self.dir.probe()  # an unreachable endpoint or a missing bucket fails here
        self._check_lease()  # another live run writes here: refuse before reading its dirs
        if self.cfg.resume:
            return self.dir.open(self.cfg.checkpoint_path, defer=True)
        if self.cfg.auto_resume:
            return self.dir.find_latest(defer=True)
        committed, _ = self.dir.scan()
        if committed:  # a fresh start would overwrite that run's step dirs and `latest`
            raise ConfigError(f"checkpoint dir {self.dir.root} holds a run at step "
                              f"{max(committed)}; pass --auto_resume to continue it or use "
                              "another --checkpoint_dir")
        return None

    def _load(self, found: Found) -> Found:
        """Load `found`; if verification finds it damaged, the next one discovery offers
        (its note says why), or an error for a checkpoint named with --checkpoint_path."""
        rejected = {}
        while True:
            entry = self.entry if self._same_world(found) else None
            problem = restore.load(found, self.dir.storage.storage_options, self.shared,
                                   entry, self.dir.verify, self.info.rank,
                                   self.info.world_size)
            if problem is None:
                return found
            if not found.discovered:
                raise CheckpointError(unusable(self.cfg.checkpoint_path, problem))
            rejected[posixpath.basename(found.path)] = problem
            found = D.agree(lambda: self.dir.fall_back(found, rejected))
            self._check(found)

    def _check(self, found: Found) -> None:
        """Refuse a checkpoint this run cannot continue: a newer format, a switch of
        --deterministic, or other data, seed, sequence length, batch geometry or model
        (runcheck.py); keep what may change."""
        check_format(found.meta, found.path)
        deterministic.check_resume(found.meta["config"], self.cfg)
        errors, self.changes = compare_run(found.meta["config"], found.meta.get(
            "data_fingerprint"), self.cfg, self.progress.data_fingerprint)
        if errors:
            raise ConfigError(mismatch_message(found.path, errors))

    def _same_world(self, found: Found) -> bool:
        return found.meta["world_size"] == self.info.world_size

    def _check_lease(self) -> None:
        try:
            self.lease.check()
        except LeaseError as e:
            raise CheckpointError(str(e)) from e

    def _acquire_lease(self) -> None:
        """Rank 0, before anything is written: one writer per checkpoint dir (lease.py)."""
        if not self.info.is_main:
            return
        try:
            self.lease.acquire()
        except LeaseError as e:
            raise CheckpointError(str(e)) from e
        except Exception as e:  # read-only or unwritable dir, missing permissions
            raise CheckpointError(f"cannot write to checkpoint dir {self.dir.root}: "
                                  f"{describe(e)}") from e

    def _log_resume(self, found: Found, seconds: float) -> None:
        rng_how = self.entry.parts["rng"].how
        for line in ([f"WARNING: {found.note}"] if found.note else []) + \
                change_lines(self.changes):
            self.metrics.say(line)
        self.metrics.log("resume", step=self.progress.step, path=found.path,
                         world_size_saved=found.meta["world_size"],
                         world_size=self.info.world_size, rng=rng_how, note=found.note,
                         changes=self.changes, seconds=seconds,
                         bytes=sum(f["size"] for f in found.files.values()))
        self.metrics.say(f"resumed from {found.path} at step {self.progress.step} (world size "
                         f"{found.meta['world_size']} -> {self.info.world_size}, rng {rng_how})")
        if note := end_note(self.progress.step, self.cfg.max_steps):
            self.metrics.say(note)

    # ------------------------------------------------------------------------ saving
    def step(self, step: int, last: bool, stopping: bool) -> None:
        """After step `step`: collect a finished async save, keep the lease alive, and save
        when due (every --checkpoint_interval steps, the last step, a stop)."""
        self.writer.poll()  # an async save that every rank has finished is logged now
        self._log_records()
        if self.info.is_main:
            self.lease.refresh()
        if due(self.cfg.checkpoint_interval, step, last) or last or stopping:
            self.save()

    def save(self) -> None:
        sd = {}
        for component in [*self.shared, self.entry]:
            sd.update(component.state_dict())
        self.writer.save(self.progress.step, sd, self.info.rank, self.info.world_size,
                         asynchronous=self.cfg.async_checkpoint)
        self.committed_step = self.progress.step
        self._log_records()

    def close(self) -> None:
        """Commit the current step if our dir lacks it (a run resumed at its final step from
        another dir or world size), wait for a save in flight, release the lease."""
        if self.committed_step != self.progress.step:
            self.save()
        self.writer.close()
        self._log_records()
        if self.info.is_main:
            self.lease.release()

    def _log_records(self) -> None:
        for record in self.writer.records():
            self.metrics.log("checkpoint", **record, rss_mb=resident_mb())
            self.metrics.say(f"step {record['step']:6d} | checkpoint {record['path']} "
                             f"committed ({record['seconds']:.2f}s, loop blocked "
                             f"{record['blocked_s']:.2f}s, {record['bytes'] or 0:,} bytes)")
