"""The checkpoint manager: the trainer's only way to checkpoints, in three calls.

    ckpt = CheckpointManager(cfg, info, metrics, progress, shared=[...], entry=RankEntry(...))
    ckpt.resume()                                  # once, before the first step
    ckpt.step(step, last=..., stopping=...)        # after every step: saves when due
    ckpt.close()                                   # at the end: the last step is committed

It owns the policy (when to save, sync or async, retention, which checkpoint to resume from)
and the writer lease; the components (state.py) own what is saved and how it comes back.

resume(), in order (every decision taken on rank 0 and agreed on, distributed.agree):
1. probe the storage, refuse a dir another live run writes (the lease, read only; a dead
   job's lease on another host that expires within --stall_timeout is waited out first);
2. pick the checkpoint: --resume names one (--checkpoint_path), --auto_resume discovers the
   newest valid one (layout.py); without either a dir that holds committed checkpoints is
   refused (a fresh start would overwrite that run), an empty one starts fresh; newer steps
   than the one picked are refused unless --drop_newer_checkpoints (newer.py);
3. check that this run can continue it: a format this code reads, and the same data, seed,
   sequence length, batch geometry and model (compat.py); what may change (LR, intervals,
   ...) is reported as WARNING lines and in the `resume` record;
4. load every component, verifying the files meanwhile (restore.py); damage makes a discovered
   checkpoint fall back to the next one, and is an error for one the user named;
5. take the writer lease: nothing is written to --checkpoint_dir before this point; with
   --async_checkpoint, start the save process (save_process.py);
6. this rank's entry is restored at the same world size; otherwise, and at a fresh start, its
   parts start fresh (loader at the global position, RNG seeded from (seed, step, rank));
7. log the `resume` record, with `requests`: what every rank sent to the store from step 1
   to 5, summed through the gather that takes the lease (store_requests.py).

Steps 1, 2, 4 and 5 and every save ride out a store outage within --store_retry_budget
(ride_out.py); two tiers: a durable tier down at the start is skipped for the local one.
Two tiers (--local_checkpoint_dir): saves go to the local tier (tiers/local.py; with
--async_checkpoint through the save process), and to the durable one by background replication
(replicate.py) once committed locally; resume takes the newer tier (tiers/policy.py).
"""

from __future__ import annotations

import posixpath
import time
from typing import NamedTuple

from dcp_train import distributed as D
from dcp_train.checkpoint import newer, restore
from dcp_train.checkpoint.async_save.save_process import SaveProcess
from dcp_train.checkpoint.compat import change_lines, check_resume, end_note
from dcp_train.checkpoint.io import store_options, store_requests
from dcp_train.checkpoint.io.lease import LeaseError, WriterLease
from dcp_train.checkpoint.layout import CheckpointDir, Found, reading, unusable
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.ride_out import FRESH, Patience, StoreTrouble, guarded, ride_out, trouble
from dcp_train.checkpoint.state import OptimizerState
from dcp_train.checkpoint.tiers.local import LocalTier
from dcp_train.checkpoint.tiers.policy import Clock, TierChoice, choose, common_step
from dcp_train.checkpoint.tiers.replicate import ReplicationReport, Replicator
from dcp_train.config import Config
from dcp_train.errors import CheckpointError, ConfigError, describe
from dcp_train.run import failure, stall
from dcp_train.run.metrics import resident_mb


class StepReport(NamedTuple):
    """What each rank tells every other after a step, in the loop's one small gather
    (`D.agree(ckpt.report, every_rank=True)`, then `ckpt.step(..., reports=...)`)."""

    sample_ids: list  # the step's sample ids on this rank (the `train` record's batch_digest)
    stop_requested: int  # the signal this rank got (SIGTERM, SIGUSR1, Ctrl-C), or 0
    due_by_time: tuple[bool, bool] | None  # rank 0: (durable, local) due by wall time
    replication: ReplicationReport | None  # this rank's view of the replication in flight


def due(interval: int, step: int, last: bool) -> bool:
    """An interval of `interval` steps (0: off) is due after `step` (or at the last step)."""
    return interval > 0 and (step % interval == 0 or last)


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
        self.dir = CheckpointDir(ck.checkpoint_dir, store_options.merged(
            ck.checkpoint_dir, cfg.storage_options_dict, ck.stall_timeout),
            verify=ck.verify_checkpoint)
        self.lease = WriterLease(self.dir.storage, ck.stall_timeout, say=metrics.say)
        self.lease_due = False  # the durable tier was down at the start: replication takes it
        self.patience = Patience(ck.store_retry_budget, ck.stall_timeout)
        # attempt() (collective, failures agreed) ridden out on the durable tier (ride_out.py)
        self._ride = lambda attempt, what: ride_out(attempt, self.patience, self.dir.root, what)
        self.writer = Checkpointer(self.dir, ck.keep_last_n_checkpoints,
                                   on_commit=self.lease.refresh, save_process=SaveProcess)
        self.writer.patience = self.patience
        self.committed_step = None  # the step whose state is committed in our dir(s)
        self.local = None
        self.replicator = None
        self.saves = self.writer  # where saves go: their records, the async save process
        if ck.local_checkpoint_dir:
            self.local = LocalTier(ck.local_checkpoint_dir, ck.keep_last_n_local_checkpoints,
                                   info.rank, info.world_size, save_process=SaveProcess)
            self.replicator = Replicator(self.writer, info.rank, metrics.say, metrics.log,
                                         ck.store_retry_budget, self._lease_for_replication)
            self.saves = self.local.protocol
        for component in shared:  # an async save copies the state before it changes
            if isinstance(component, OptimizerState):
                component.optimizer.register_step_pre_hook(lambda *_: self.saves.staged())
        self.clock = Clock(cfg)  # the _minutes intervals (rank 0's decides)
        self.tier: TierChoice | None = None
        self.changes = {}  # {flag: [saved, now]} of what this resume changed (compat.py)
        self.newer = {}  # {tier: [steps]} --drop_newer_checkpoints deletes (newer.py)

    @property
    def root(self) -> str:  # named by layout.reading's errors
        return self.dir.root

    # ----------------------------------------------------------------------- resume
    def resume(self, at_fresh_start=lambda: None) -> None:
        """Collective, once before the first step: the steps of the module docstring;
        at_fresh_start() runs (every rank) at a fresh start before the lease (--init_from)."""
        t0, mark = time.perf_counter(), store_requests.snapshot()
        failure.set_activity("the resume")
        if self.local is not None:
            self.local.setup()
        time.sleep(D.agree(self.lease.expiry_wait))  # a dead job's lease on another host
        found = self._discover()
        self.newer = {"durable": found.newer if found is not None else ()}  # see save()
        if self.local is not None:
            found = self._choose_tier(found)
        if found is not None:
            self._check(found)
            found = self._load(found)
        else:  # a refusal there (--init_from's weights) leaves nothing written
            at_fresh_start()
        requests = store_requests.total(*self._take_lease(mark))
        if self.ck.async_checkpoint:  # its start-up (seconds) overlaps the first steps
            self.saves.start_save_process(self.info.rank, self.info.world_size)
        self.clock.start()
        if found is None or not self._same_world(found):
            self.entry.fresh()
        if found is None:
            if self.ck.auto_resume:
                self.metrics.say(f"no checkpoint in {self.dir.root}: starting fresh at step 0")
            return
        stall.committed(found.step)  # named if a rank stalls (run/stall.py)
        if found.path == self.dir.step_path(found.step) or self._from_local:
            self.committed_step = found.step
        self._log_resume(found, time.perf_counter() - t0, requests)
        if self._from_local:
            per_rank = self.local.unreplicated(found, self.replicator.durable_step)
            if per_rank is not None:  # meant for the durable tier, not there yet
                self.replicator.submit(found.step, found.path, per_rank,
                                       found.checksum)

    def _discover(self) -> Found | None:
        """Every rank: the durable tier's checkpoint (_choose), riding out an outage; with a
        local tier and --auto_resume one try: if the store is down, the local tier's
        (_choose_tier), and replication takes the lease once it answers (lease_due)."""
        attempt = lambda: D.agree(guarded(self._choose))  # noqa: E731
        if self.local is None or not self.ck.auto_resume:
            return self._ride(attempt, "the resume (discovery)" if self.ck.resume
                              or self.ck.auto_resume else FRESH)
        try:
            return attempt()
        except StoreTrouble as e:
            self.metrics.say(f"WARNING: the durable tier {self.dir.root} does not answer at the "
                             f"start ({e}); resuming from the local tier, replicating later")
            self.lease_due = True
            return None

    def _lease_for_replication(self) -> None:
        """Rank 0, replication's first phase: the durable tier's lease, if it was down."""
        if self.lease_due:
            self._acquire_lease()
            self.lease_due = False

    @reading
    def _choose(self) -> Found | None:
        """Rank 0: the checkpoint to resume from (its shard checksums are checked while
        loading), or None."""
        self.dir.probe()  # an unreachable endpoint or a missing bucket fails here
        self.lease.check()  # another live run writes here: refuse before reading its dirs
        if self.ck.resume or self.ck.auto_resume:  # never behind newer steps (newer.py)
            return newer.pick(self.dir, self.ck, self.metrics.say)
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
            local = self._from_local
            problem = self._ride(lambda: restore.load(
                found, {} if local else self.dir.storage.storage_options, self.shared, entry,
                self.dir.verify, self.info.rank, self.info.world_size,
                mine=self.local.written_by_me(found.path) if local else None),
                f"the resume (loading step {found.step})")
            if problem is None:
                return found
            if local:  # a damaged local checkpoint: the durable tier's newest instead
                self.tier = TierChoice("durable",
                                       f"local step {found.step} is damaged ({problem})")
                found = self._ride(lambda: D.agree(guarded(
                    lambda: self.dir.find_latest(defer=True))), "the resume (discovery)")
                if found is None:
                    raise CheckpointError(f"{self.tier.reason} and {self.dir.root} holds no "
                                          "checkpoint; move the local dir away to start fresh")
                self._check(found)
                continue
            if not found.discovered:  # the step dir, also where --checkpoint_path is its dir
                raise CheckpointError(unusable(found.path, problem))
            rejected[posixpath.basename(found.path)] = problem
            found = self._ride(lambda: D.agree(guarded(
                lambda: self.dir.fall_back(found, rejected))), "the resume (discovery)")
            self._check(found)

    @property
    def _from_local(self) -> bool:
        return self.tier is not None and self.tier.tier == "local"

    def _choose_tier(self, durable: Found | None) -> Found | None:
        """Every rank: the durable tier's `durable`, or the local tier's newest checkpoint
        that every rank can load (tier_policy.choose); self.tier says which and why."""
        usable = D.agree(self.local.usable, every_rank=True)
        if not self.ck.auto_resume:
            if any(usable) and not self.ck.resume:
                raise ConfigError(f"--local_checkpoint_dir {self.local.root} holds a run at "
                                  f"step {max(s for u in usable for s in u)}; pass "
                                  "--auto_resume to continue it or use another dir")
            if durable is not None:  # the local tier's steps newer than --checkpoint_path's
                self.newer["local"] = newer.check_local(self.local.root, usable, durable.step,
                                                        self.ck.drop_newer_checkpoints)
            self.tier = TierChoice("durable", "--checkpoint_path names it") if durable else None
            return durable
        self.replicator.durable_step = durable.step if durable is not None else -1
        local, why = choose(usable, self.local.nodes, self.replicator.durable_step)
        if not local and self.lease_due:  # nothing local: the durable tier it must be
            self.lease_due = False
            return self._choose_tier(self._ride(lambda: D.agree(guarded(self._choose)),
                                                "the resume (discovery)"))
        if not local:
            self.tier = TierChoice("durable", why) if durable is not None else None
            return durable
        down = "the durable tier did not answer"  # at the start (lease_due)
        self.tier = TierChoice("local", why.replace("the durable tier has none", down)
                               if self.lease_due else why)
        return self.local.found(common_step(usable))

    def _check(self, found: Found) -> None:
        """Refuse a checkpoint this run cannot continue: a newer format, a switch of
        --deterministic, or other data, seed, sequence length, batch geometry or model
        (compat.py); keep what may change."""
        self.changes = check_resume(found.meta, found.path, self.cfg,
                                    self.progress.data_fingerprint)

    def _same_world(self, found: Found) -> bool:
        return found.meta["world_size"] == self.info.world_size

    def _take_lease(self, mark) -> list[dict]:
        """Every rank: rank 0 takes the lease (not while lease_due); every rank's store
        requests since `mark` (the gather this makes is how the resume's are summed)."""
        if self.lease_due:
            return [store_requests.since(mark)]
        take = lambda: self._acquire_lease() or store_requests.since(mark)  # noqa: E731
        return self._ride(lambda: D.agree(guarded(take), every_rank=True),
                          "the resume (writer lease)")

    def _acquire_lease(self) -> None:
        """Rank 0, before anything is written: one writer per checkpoint dir (lease.py)."""
        if not self.info.is_main:
            return
        try:
            self.lease.acquire()
        except LeaseError:
            raise
        except Exception as e:  # read-only or unwritable dir, missing permissions
            raise CheckpointError(f"cannot write to checkpoint dir {self.dir.root}: "
                                  f"{describe(e)}") from e

    def _log_resume(self, found: Found, seconds: float, requests: dict) -> None:
        rng_how = self.entry.parts["rng"].how
        warnings = [f"WARNING: {found.note}"] if found.note else []
        for line in warnings + change_lines(self.changes):
            self.metrics.say(line)
        self.metrics.log("resume", step=self.progress.step, path=found.path,
                         world_size_saved=found.meta["world_size"],
                         world_size=self.info.world_size, rng=rng_how, note=found.note,
                         changes=self.changes, seconds=seconds,
                         bytes=sum(f["size"] for f in found.files.values()),
                         requests=requests,
                         **({"tier": self.tier.tier, "tier_reason": self.tier.reason}
                            if self.tier else {}))
        self.metrics.say(f"resumed from {found.path} at step {self.progress.step} (world size "
                         f"{found.meta['world_size']} -> {self.info.world_size}, rng {rng_how}"
                         + (f", {store_requests.line(requests)}" if requests["total"] else "")
                         + ")")
        if self.tier:
            self.metrics.say(f"resumed from the {self.tier.tier} tier: {self.tier.reason}")
        if note := end_note(self.progress.step, self.cfg.training.max_steps):
            self.metrics.say(note)

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
        self.saves.poll()  # an async save that every rank has finished is logged now
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
        newer.drop_all(self, self._ride)  # --drop_newer_checkpoints: at the first save
        sd = {}
        for component in [*self.shared, self.entry]:
            sd.update(component.state_dict())
        if self.local is None:
            self.writer.save(self.progress.step, sd, self.info.rank, self.info.world_size,
                             asynchronous=self.ck.async_checkpoint)
        else:  # replicated once committed locally (_log_records)
            self.local.save(self.progress.step, sd, durable, self.replicator.durable_step,
                            asynchronous=self.ck.async_checkpoint,
                            pending=sorted(self.replicator.steps()))
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
        self.saves.close()
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
        for record in self.saves.records():
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
