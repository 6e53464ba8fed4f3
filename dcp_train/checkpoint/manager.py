"""The checkpoint manager: the trainer's only way to checkpoints, in three calls.

    ckpt = CheckpointManager(cfg, info, metrics, progress, shared=[...], entry=RankEntry(...))
    ckpt.resume()                                  # once, before the first step
    ckpt.step(step, last=..., stopping=...)        # after every step: saves when due
    ckpt.close()                                   # at the end: the last step is committed

It owns the policy (when to save, sync or async, retention, which checkpoint to resume from)
and the writer lease; the components (state.py) own what is saved and how it comes back.

resume() (resume.py: probe, discovery or the named checkpoint, the resume rules, the load
with verification and fall-back, the writer lease), then: with --async_checkpoint, start the
save process (save_process.py); this rank's entry is restored at the same world size,
otherwise, and at a fresh start, its parts start fresh (loader at the global position, RNG
seeded from (seed, step, rank)); the `resume` record.

The resume and every save ride out a store outage within --store_retry_budget
(ride_out.py); two tiers: a durable tier down at the start is skipped for the local one.
Two tiers (--local_checkpoint_dir): saves go to the local tier (tiers/local.py; with
--async_checkpoint through the save process), and to the durable one by background replication
(replicate.py) once committed locally; resume takes the newer tier (tiers/policy.py).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from dcp_train import distributed as D
from dcp_train.checkpoint import newer
from dcp_train.checkpoint.async_save.save_process import SaveProcess
from dcp_train.checkpoint.io.lease import WriterLease
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.resume import Resume, TierChoice, acquire_lease
from dcp_train.checkpoint.ride_out import Patience, trouble
from dcp_train.checkpoint.state import OptimizerState
from dcp_train.checkpoint.tiers.local import LocalTier
from dcp_train.checkpoint.tiers.policy import Clock
from dcp_train.checkpoint.tiers.replicate import ReplicationReport, Replicator
from dcp_train.config import Config
from dcp_train.errors import describe
from dcp_train.job import failure, stall
from dcp_train.job.metrics import resident_mb
from dcp_train.job.schedule import due
from dcp_train.store import requests as store_requests


class StepReport(NamedTuple):
    """What each rank tells every other after a step, in the loop's one small gather
    (`D.agree(ckpt.report, every_rank=True)`, then `ckpt.step(..., reports=...)`)."""

    sample_ids: list  # the step's sample ids on this rank (the `train` record's batch_digest)
    stop_requested: int  # the signal this rank got (SIGTERM, SIGUSR1, Ctrl-C), or 0
    due_by_time: tuple[bool, bool] | None  # rank 0: (durable, local) due by wall time
    replication: ReplicationReport | None  # this rank's view of the replication in flight


class CheckpointManager:
    """The trainer's checkpoints, in three calls (the module docstring)."""

    def __init__(self, cfg: Config, info, metrics, progress, shared: list, entry):
        """shared: the components whose shards every rank saves (model, optimizer, progress);
        entry: this rank's own RankEntry (RNG, loader)."""
        self.cfg = cfg
        ck = self.ck = cfg.checkpoint  # this manager's section of the config
        self.info = info
        self.metrics = metrics
        self.progress = progress
        self.shared = shared
        self.entry = entry
        self.dir = CheckpointDir(ck.checkpoint_dir, cfg.storage_options_dict,
                                 verify=ck.verify_checkpoint, stall_timeout=ck.stall_timeout)
        self.lease = WriterLease(self.dir.storage, ck.stall_timeout, say=metrics.say)
        self.lease_due = False  # the durable tier was down at the start: replication takes it
        # (the resume's decision, Resume.lease_due)
        self.patience = Patience(ck.store_retry_budget, ck.stall_timeout)
        checkpointer = Checkpointer(self.dir, ck.keep_last_n_checkpoints,  # the durable tier's
                                    on_commit=self.lease.refresh, save_process=SaveProcess)
        checkpointer.patience = self.patience
        self.committed_step = None  # the step whose state is committed in our dir(s)
        self.local = None
        self.replicator = None
        self.checkpointer = checkpointer  # where saves go: their records, the save process
        if ck.local_checkpoint_dir:
            self.local = LocalTier(ck.local_checkpoint_dir, ck.keep_last_n_local_checkpoints,
                                   info.rank, info.world_size, save_process=SaveProcess)
            self.replicator = Replicator(checkpointer, info.rank, metrics.say, metrics.log,
                                         ck.store_retry_budget, self._lease_for_replication)
            self.checkpointer = self.local.checkpointer
        for component in shared:  # an async save copies the state before it changes
            if isinstance(component, OptimizerState):
                component.optimizer.register_step_pre_hook(lambda *_: self.checkpointer.staged())
        self.clock = Clock(cfg)  # the _minutes intervals (rank 0's decides)
        self.tier: TierChoice | None = None  # the resume's choice of tier (resume.py)
        self.newer = {}  # {tier: [steps]} --drop_newer_checkpoints deletes (newer.py)

    # ----------------------------------------------------------------------- resume
    def resume(self, at_fresh_start=lambda: None) -> None:
        """Collective, once before the first step: resume.py's steps 1-5, then the save
        process, this rank's entry (fresh unless restored), the `resume` record.
        at_fresh_start() runs (every rank) at a fresh start before the lease (--init_from),
        so that a refusal there leaves nothing written."""
        failure.set_activity("the resume")
        resuming = Resume(self.cfg, self.info, self.metrics, self.progress, self.shared,
                          self.entry, self.dir, self.lease, self.patience, self.local,
                          self.replicator)
        found = resuming.run(at_fresh_start)
        self.lease_due, self.tier, self.newer = resuming.lease_due, resuming.tier, resuming.newer
        if self.ck.async_checkpoint:  # its start-up (seconds) overlaps the first steps
            self.checkpointer.start_save_process(self.info.rank, self.info.world_size)
        self.clock.start()
        if found is None or not resuming.same_world(found):
            self.entry.fresh()
        if found is None:
            if self.ck.auto_resume:
                self.metrics.say(f"no checkpoint in {self.dir.root}: starting fresh at step 0")
            return
        stall.committed(found.step)  # named if a rank stalls (job/stall.py)
        if found.path == self.dir.step_path(found.step) or resuming.from_local:
            self.committed_step = found.step
        resuming.log(found)
        if resuming.from_local:
            per_rank = self.local.unreplicated(found, self.replicator.durable_step)
            if per_rank is not None:  # meant for the durable tier, not there yet
                self.replicator.submit(found.step, found.path, per_rank,
                                       found.checksum)

    def _lease_for_replication(self) -> None:
        """Rank 0, replication's first phase: the durable tier's lease, if it was down."""
        if self.lease_due:
            acquire_lease(self.lease, self.info.is_main, self.dir.root)
            self.lease_due = False

    # ------------------------------------------------------------------------ saving
    def report(self, sample_ids: list = (), stop_requested: int = 0) -> StepReport:
        """This rank's StepReport: the loop's part (sample ids, a stop request), rank 0's
        wall-time intervals, the replication's state (replicate.py)."""
        return StepReport(list(sample_ids), stop_requested,
                          self.clock.due() if self.info.is_main else None,
                          self.replicator.report() if self.replicator else None)

    def step(self, step: int, last: bool, stopping: bool,
             reports: list[StepReport] | None = None) -> None:
        """After step `step`: collect a finished async save, keep the lease alive, move the
        replication on, and save when due (every --checkpoint_interval steps or
        --checkpoint_interval_minutes, the last step, a stop; the local tier's own
        intervals). reports: every rank's report() from the per-step gather."""
        self.checkpointer.poll()  # an async save that every rank has finished is logged now
        self._log_records()
        if self.info.is_main and not self.lease_due:
            self._lease(self.lease.refresh)
        if reports is None and (self.local is not None or self.clock.enabled):
            reports = D.agree(self.report, every_rank=True)
        if self.replicator is not None:
            self.replicator.advance([r.replication for r in reports])
        by_time = reports[0].due_by_time if reports else (False, False)
        if due(self.ck.checkpoint_interval, step, last) or by_time[0] or last or stopping:
            self.save()
        elif self.local is not None and (due(self.ck.local_checkpoint_interval, step, False)
                                         or by_time[1]):
            self.save(durable=False)

    def save(self, durable: bool = True) -> None:
        """Save the current step: on the durable tier, or locally (replicated if `durable`)."""
        failure.set_activity(f"the save of step {self.progress.step}")
        if self.newer:  # --drop_newer_checkpoints: at the first save (newer.py)
            durable_tier = self.replicator.checkpointer if self.replicator else self.checkpointer
            newer.drop_all(self.newer, durable_tier, self.local, self.patience, self.metrics.say)
            self.newer = {}
        t0 = time.perf_counter()  # the save's clock: the loop is blocked from here (blocked_s)
        sd = {}
        for component in [*self.shared, self.entry]:
            sd.update(component.state_dict())
        if self.local is None:
            self.checkpointer.save(self.progress.step, sd, self.info.rank, self.info.world_size,
                                   asynchronous=self.ck.async_checkpoint, t0=t0)
        else:  # replicated once committed locally (_log_records)
            self.local.save(self.progress.step, sd, durable, self.replicator.durable_step,
                            asynchronous=self.ck.async_checkpoint,
                            pending=sorted(self.replicator.steps()), t0=t0)
            self.clock.saved("local")
        if durable:
            self.clock.saved("durable")
        self.committed_step = self.progress.step
        self._log_records()

    def close(self) -> None:
        """Commit the current step if not saved (a run resumed at its final step from another
        dir or world size), wait for a save or replication in flight, release the lease."""
        if self.committed_step != self.progress.step:
            self.save()
        self.checkpointer.close()
        self._log_records()  # a last local save meant for the durable tier goes to replication
        if self.replicator is not None:
            self.replicator.finish()
        if self.info.is_main and not self.lease_due:
            self._lease(self.lease.release)

    def _lease(self, op) -> None:
        try:
            op()
        except Exception as e:  # a store outage (or any failure, with a local tier) is a
            if self.local is None and trouble(e) is None:  # warning: the next try may do
                raise
            self.metrics.say(f"WARNING: {op.__name__} of {self.lease.path} failed: "
                             f"{describe(e)}")

    def _log_records(self) -> None:
        """Log the `checkpoint` records of the saves committed since the last call; a local
        save meant for the durable tier is handed to replication here, so replication always
        follows the local commit (an async one too)."""
        for record in self.checkpointer.records():
            stall.committed(record["step"])
            per_rank = record.pop("per_rank", None)
            if record.pop("replicate", False):
                self.replicator.submit(record["step"], record["path"], per_rank)
            self.metrics.log("checkpoint", **record, rss_mb=resident_mb())
            tier = f"{record['tier']} " if "tier" in record else ""
            reqs = record.get("requests") or {}
            self.metrics.say(f"step {record['step']:6d} | {tier}checkpoint "
                             f"{record['path']} committed ({record['seconds']:.2f}s, loop "
                             f"blocked {record['blocked_s']:.2f}s, {record['bytes'] or 0:,} bytes"
                             + (f", {store_requests.line(reqs)}" if reqs.get("total") else "")
                             + ")")
