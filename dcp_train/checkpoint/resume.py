"""The resume: which checkpoint a launch continues, checked, loaded, and the lease taken.

    resuming = Resume(cfg, info, metrics, progress, shared, entry, directory, lease, patience,
                      local=local_tier, replicator=replicator)
    found = resuming.run()         # collective: steps 1-5; None: a fresh start
    resuming.log(found)            # the `resume` record and its console lines

The manager (manager.py) calls it once from CheckpointManager.resume() and keeps what it
decided (the tier, lease_due). One directory view (`directory`, its Storage) serves the whole
resume: discovery, a fall-back after damage and the load read through it.

run(), in order (every decision taken on rank 0 and agreed on, distributed.agree):
1. probe the storage, refuse a dir another live run writes (the lease, read only; a dead
   job's lease on another host that expires within --stall_timeout is waited out first);
2. pick the checkpoint: --resume names one (--checkpoint_path), --auto_resume discovers the
   newest valid one (layout.py); without either a dir that holds committed checkpoints is
   refused (a fresh start would overwrite that run), an empty one starts fresh; newer steps
   than the one picked are refused unless --drop_newer_checkpoints (newer.py); with a local
   tier, the newer tier (tiers/policy.py);
3. check that this run can continue it: a format this code reads, and the same data, seed,
   sequence length, batch geometry and model (resume_rules.py); what may change (LR,
   intervals, ...) is reported as WARNING lines and in the `resume` record;
4. load every component, verifying the files meanwhile (restore.py); damage makes a discovered
   checkpoint fall back to the next one, and is an error for one the user named;
5. take the writer lease: nothing is written to --checkpoint_dir before this point; the
   requests every rank sent to the store from step 1 to 5 are summed through the gather that
   takes it (store/requests.py).

Steps 1, 2, 4 and 5 ride out a store outage within --store_retry_budget (ride_out.py); with two
tiers, a durable tier down at the start is skipped for the local one (lease_due: replication
takes the lease once the store answers).
"""

from __future__ import annotations

import posixpath
import time
from typing import NamedTuple

from dcp_train import distributed as D
from dcp_train.checkpoint import newer, restore
from dcp_train.checkpoint.io.lease import LeaseError, WriterLease
from dcp_train.checkpoint.layout import CheckpointDir, Found, reading, unusable
from dcp_train.checkpoint.resume_rules import change_lines, check_resume, end_note
from dcp_train.checkpoint.ride_out import (FRESH, Patience, StoreTrouble, agreed_phase, guarded,
                                           ride_out)
from dcp_train.checkpoint.tiers.policy import choose, common_step
from dcp_train.config import Config
from dcp_train.errors import CheckpointError, ConfigError, describe
from dcp_train.store import requests as store_requests

DISCOVERY = "the resume (discovery)"


class TierChoice(NamedTuple):
    """With a local tier: the tier a resume loaded from, and why (the `resume` record)."""

    tier: str  # "local" or "durable"
    reason: str


def acquire_lease(lease: WriterLease, is_main: bool, root: str) -> None:
    """Rank 0, before anything is written: one writer per checkpoint dir (lease.py)."""
    if not is_main:
        return
    try:
        lease.acquire()
    except LeaseError:
        raise
    except Exception as e:  # read-only or unwritable dir, missing permissions
        raise CheckpointError(f"cannot write to checkpoint dir {root}: {describe(e)}") from e


class Resume:
    """One resume, collective (the module docstring). `local`, `replicator`: the local tier and
    the replication to the durable one (tiers/), or None."""

    def __init__(self, cfg: Config, info, metrics, progress, shared: list, entry,
                 directory: CheckpointDir, lease: WriterLease, patience: Patience,
                 local=None, replicator=None):
        self.cfg, self.ck = cfg, cfg.checkpoint
        self.info, self.metrics, self.progress = info, metrics, progress
        self.shared, self.entry = shared, entry
        self.dir, self.lease, self.patience = directory, lease, patience
        self.local, self.replicator = local, replicator
        self.lease_due = False  # the durable tier was down at the start: replication takes it
        self.tier: TierChoice | None = None
        self.changes = {}  # {flag: [saved, now]} of what this resume changed (resume_rules.py)
        self.requests: dict = {}  # store requests of steps 1-5, every rank summed
        self.newer = {}  # {tier: [steps]} --drop_newer_checkpoints deletes (newer.py)
        self._t0 = time.perf_counter()

    @property
    def root(self) -> str:  # named by layout.reading's errors
        return self.dir.root

    def run(self, at_fresh_start=lambda: None) -> Found | None:
        """Steps 1-5 of the module docstring: the loaded checkpoint, or None (a fresh start);
        at_fresh_start() runs at a fresh start before the lease (a refusal there, e.g.
        --init_from's weights, leaves nothing written)."""
        self._t0, mark = time.perf_counter(), store_requests.snapshot()
        if self.local is not None:
            self.local.setup()
        time.sleep(D.agree(self.lease.expiry_wait))  # a dead job's lease on another host
        found = self._keep_newer(self._discover())
        if self.local is not None:
            found = self._choose_tier(found)
        if found is not None:
            self._check(found)
            found = self._load(found)
        else:
            at_fresh_start()
        self.requests = store_requests.total(*self._take_lease(mark))
        return found

    @property
    def from_local(self) -> bool:
        return self.tier is not None and self.tier.tier == "local"

    def same_world(self, found: Found) -> bool:
        return found.meta["world_size"] == self.info.world_size

    def _phase(self, fn, what: str = DISCOVERY, every_rank: bool = False):
        return agreed_phase(fn, self.patience, self.dir.root, what, every_rank)

    def _discover(self) -> Found | None:
        """Every rank: the durable tier's checkpoint (_choose), riding out an outage; with a
        local tier and --auto_resume one try: if the store is down, the local tier's
        (_choose_tier), and replication takes the lease once it answers (lease_due)."""
        if self.local is None or not self.ck.auto_resume:
            resuming = self.ck.resume or self.ck.auto_resume
            return self._phase(self._choose, DISCOVERY if resuming else FRESH)
        try:
            return D.agree(guarded(self._choose))  # one try, not ridden out
        except StoreTrouble as e:
            self.metrics.say(f"WARNING: the durable tier {self.dir.root} does not answer at the "
                             f"start ({e}); resuming from the local tier, replicating later")
            self.lease_due = True
            return None

    def _keep_newer(self, found: Found | None) -> Found | None:
        """Keep the durable tier's steps newer than `found` (newer.pick), which
        --drop_newer_checkpoints deletes at the first save (CheckpointManager.save)."""
        if found is not None and found.newer:
            self.newer["durable"] = found.newer
        return found

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
            entry = self.entry if self.same_world(found) else None
            local = self.from_local
            storage = self.local.storage if local else self.dir.storage_for(found.path)
            problem = ride_out(lambda: restore.load(
                found, storage, self.shared, entry, self.dir.verify, self.info.rank,
                self.info.world_size, mine=self.local.written_by_me(found.path) if local else None),
                self.patience, self.dir.root, f"the resume (loading step {found.step})")
            if problem is None:
                return found
            if local:  # a damaged local checkpoint: the durable tier's newest instead
                self.tier = TierChoice("durable",
                                       f"local step {found.step} is damaged ({problem})")
                found = self._phase(lambda: self.dir.find_latest(defer=True))
                if found is None:
                    raise CheckpointError(f"{self.tier.reason} and {self.dir.root} holds no "
                                          "checkpoint; move the local dir away to start fresh")
                self._check(found)
                continue
            if not found.discovered:  # the step dir, also where --checkpoint_path is its dir
                raise CheckpointError(unusable(found.path, problem))
            rejected[posixpath.basename(found.path)] = problem
            # discovered checkpoints are this dir's: the same view offers the next one
            found = self._phase(lambda: self.dir.find_latest(defer=True, rejected=rejected))
            self._check(found)

    def _choose_tier(self, durable: Found | None) -> Found | None:
        """Every rank: the durable tier's `durable`, or the local tier's newest checkpoint
        that every rank can load (tiers/policy.choose); self.tier says which and why."""
        usable = D.agree(self.local.usable, every_rank=True)
        if not self.ck.auto_resume:
            if any(usable) and not self.ck.resume:
                raise ConfigError(f"--local_checkpoint_dir {self.local.root} holds a run at "
                                  f"step {max(s for u in usable for s in u)}; pass "
                                  "--auto_resume to continue it or use another dir")
            if durable is not None:  # the local tier's steps newer than --checkpoint_path's
                local_newer = newer.check_local(self.local.root, usable, durable.step,
                                                self.ck.drop_newer_checkpoints)
                if local_newer:
                    self.newer["local"] = local_newer
            self.tier = TierChoice("durable", "--checkpoint_path names it") if durable else None
            return durable
        self.replicator.durable_step = durable.step if durable is not None else -1
        local, why = choose(usable, self.local.nodes, self.replicator.durable_step)
        if not local and self.lease_due:  # nothing local: the durable tier it must be
            self.lease_due = False
            return self._choose_tier(self._keep_newer(self._phase(self._choose)))
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
        (resume_rules.py); keep what may change."""
        self.changes = check_resume(found.meta, found.path, self.cfg,
                                    self.progress.data_fingerprint)

    def _take_lease(self, mark) -> list[dict]:
        """Every rank: rank 0 takes the lease (not while lease_due); every rank's store
        requests since `mark` (the gather this makes is how the resume's are summed)."""
        if self.lease_due:
            return [store_requests.since(mark)]
        take = lambda: acquire_lease(self.lease, self.info.is_main,  # noqa: E731
                                     self.dir.root) or store_requests.since(mark)
        return self._phase(take, "the resume (writer lease)", every_rank=True)

    def log(self, found: Found) -> None:
        """The `resume` record of `found` (loaded by run) and its console lines."""
        seconds = time.perf_counter() - self._t0
        rng_how = self.entry.parts["rng"].how
        warnings = [f"WARNING: {found.note}"] if found.note else []
        for line in warnings + change_lines(self.changes):
            self.metrics.say(line)
        self.metrics.log("resume", step=self.progress.step, path=found.path,
                         world_size_saved=found.meta["world_size"],
                         world_size=self.info.world_size, rng=rng_how, note=found.note,
                         changes=self.changes, seconds=seconds,
                         bytes=sum(f["size"] for f in found.files.values()),
                         requests=self.requests,
                         **({"tier": self.tier.tier, "tier_reason": self.tier.reason}
                            if self.tier else {}))
        self.metrics.say(f"resumed from {found.path} at step {self.progress.step} (world size "
                         f"{found.meta['world_size']} -> {self.info.world_size}, rng {rng_how}"
                         + (f", {store_requests.line(self.requests)}"
                            if self.requests["total"] else "") + ")")
        if self.tier:
            self.metrics.say(f"resumed from the {self.tier.tier} tier: {self.tier.reason}")
        if note := end_note(self.progress.step, self.cfg.training.max_steps):
            self.metrics.say(note)
