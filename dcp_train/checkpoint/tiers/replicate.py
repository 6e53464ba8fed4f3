"""Replication: a committed local checkpoint copied to the durable tier in the background.

A save due on both tiers is one save: committed on the local tier (tiers/local.py), then handed to
the Replicator, which copies it to --checkpoint_dir under the durable tier's own rules
(protocol.py, whose protocol it calls): files in place under `step_XXXXXXXX/` (a temp dir
on a local durable dir), `manifest.json` last (the commit; its sizes and checksums are the ones
computed while the local save wrote the files, nothing is read twice), `latest` only after,
then the durable retention. One job runs in three phases, each on a background thread:

    prepare   rank 0: the dir to write into; leftovers of a crashed attempt at that step go
    upload    every rank: the files it wrote itself, from its own node, in one parallel
              fsspec put; then a listing checks their sizes against the manifest's
    commit    rank 0, once every rank's upload is done: check the listing, manifest, `latest`

Ranks agree on phase changes at step boundaries, through the one small gather train/loop.py
already does per step (`report()` goes into it, `advance()` reads every rank's report), so
replication adds no collective to a step. A failed phase (bucket unreachable, ...) is
retried after 2, 4, ... 60 s by rank 0's clock; training goes on. An outage is said twice: one
WARNING at its first failure, one line when a phase succeeds again (not a line per retry). Each request
has timeouts (io/store_options.py), so a store that does not answer fails a phase too. A phase
still failing --store_retry_budget seconds after its first failure (rank 0's clock) is given
up with a WARNING: the step stays on the local tier, the next save's job tries again. A newer job
supersedes a waiting one, or a failed one before its commit phase (catching up means copying
the newest checkpoint, not every one missed; a commit is cheap and may have passed its
commit point already, so it is retried). At the end of the run `finish()` waits for the job in flight, with three
attempts; a step that did not make it stays on the local tier, which the next
--auto_resume resumes from and replicates.
"""

from __future__ import annotations

import os
import posixpath
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from dcp_train import distributed as D
from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.manifest import MANIFEST
from dcp_train.errors import describe
from dcp_train.run.faults import fault_point

PHASES = ("prepare", "upload", "commit")


class ReplicationReport(NamedTuple):
    """One rank's view of the job in flight, exchanged at every step boundary."""

    step: int
    phase: str
    attempts: int  # of the current phase
    state: str  # 'running', 'done', 'failed' (waiting to retry) or this rank's error
    answer: Any  # rank 0's result of a finished phase (prepare: the dir; commit: the bytes)
    retry_due: bool  # by this rank's clock (rank 0's decides)
    over_budget: bool = False  # failing for longer than the retry budget (rank 0's decides)


@dataclass
class Job:
    step: int
    src: str  # this rank's local step dir
    per_rank: list  # every rank's {file: [size, hex digest]} (the local save's)
    checksum: str = C.CHECKSUM  # which (a local checkpoint of an older build: crc32)
    phase: str = "prepare"
    target: str | None = None  # the durable dir written into (rank 0's answer to prepare)
    attempts: int = 0  # of the current phase
    error: str | None = None  # the failure of its last attempt, agreed by every rank
    t0: float = 0.0
    failing_since: float | None = None  # time.monotonic() of the current phase's 1st failure


class Replicator:
    def __init__(self, durable, rank: int, say, log, budget_s: float = float("inf"),
                 before_prepare=None):
        """durable: the durable tier's Checkpointer; say/log: metrics.say/metrics.log;
        budget_s: --store_retry_budget; before_prepare(): run by rank 0 at the start of each
        prepare phase (the manager's: take the durable tier's writer lease if not yet)."""
        self.durable, self.storage, self.rank = durable, durable.storage, rank
        self.budget_s, self.before_prepare = budget_s, before_prepare
        self.say, self.log = say, log
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dcp_train-replicate")
        self.job: Job | None = None
        self.waiting: Job | None = None
        self.future: Future | None = None
        self.durable_step = -1  # the durable tier's newest committed step
        self.retry_at = 0.0  # rank 0's clock
        self.outage_since = None  # monotonic time of the first failure of an outage

    # ------------------------------------------------------------------ the step boundary
    def submit(self, step: int, src: str, per_rank: list, checksum: str = C.CHECKSUM) -> None:
        """Replicate local step `step` (same call on every rank); it waits for the job in
        flight, and supersedes one that waits. per_rank: see Job."""
        job = Job(step, src, per_rank, checksum)
        if self.job is None:
            self._start(job)
        else:
            if self.waiting is not None:
                self.say(f"WARNING: replication of step {self.waiting.step} skipped: step "
                         f"{step} is newer")
            self.waiting = job

    def report(self) -> ReplicationReport | None:
        """This rank's part of the per-step gather; None without a job."""
        job = self.job
        if job is None:
            return None
        answer = None
        if job.error is not None:
            state = "failed"
        elif self.future is None:
            state = "done"
        elif not self.future.done():
            state = "running"
        elif self.future.exception() is not None:
            state = describe(self.future.exception(), self.storage.root)
        else:
            state, answer = "done", self.future.result()
        now = time.monotonic()
        return ReplicationReport(job.step, job.phase, job.attempts, state, answer,
                                 now >= self.retry_at, job.failing_since is not None
                                 and now - job.failing_since > self.budget_s)

    def advance(self, reports: list[ReplicationReport | None]) -> None:
        """Every rank, with every rank's report: move the job on, the same way everywhere."""
        job = self.job
        if job is None or any(r is None or (r.step, r.phase, r.attempts) !=
                              (job.step, job.phase, job.attempts) for r in reports):
            return
        states = [r.state for r in reports]
        if "running" in states:
            return
        errors = [s for s in states if s not in ("done", "failed")]
        if job.error is None and not errors:
            self._next_phase(job, reports[0].answer)
        elif self.waiting is not None and job.phase != "commit":  # a commit is retried
            self.say(f"WARNING: replication of step {job.step} given up "
                     f"({job.error or errors[0]}): step {self.waiting.step} is newer")
            self._start(self.waiting)
        elif job.error is None:
            self._failed(job, errors[0])
        elif reports[0].over_budget:  # rank 0's clock decides
            self._give_up(job)
        elif reports[0].retry_due:
            self._run(job)

    def _give_up(self, job: Job) -> None:
        self.say(f"WARNING: replicating step {job.step} to {self.storage.root} given up after "
                 f"{time.monotonic() - job.failing_since:.0f}s of failures ({job.phase}: "
                 f"{job.error}), past --store_retry_budget {self.budget_s:g}s; training goes on, "
                 "the next save is replicated again; the step is on the local tier")
        self.job, waiting, self.waiting = None, self.waiting, None
        if waiting is not None:
            self._start(waiting)

    def _failed(self, job: Job, error: str) -> None:
        delay = min(60.0, 2.0 * 2 ** (job.attempts - 1))
        if self.outage_since is None:  # said once when the failures start (module doc)
            self.outage_since = time.monotonic()
            self.say(f"WARNING: replicating step {job.step} to {self.storage.root} failed "
                     f"({job.phase}): {error}; training goes on, retrying with backoff "
                     "(2 s up to 60 s) until it answers; the step is safe on the local tier")
        job.error, self.future = error, None
        self.retry_at = time.monotonic() + delay
        if job.failing_since is None:
            job.failing_since = time.monotonic()

    def _next_phase(self, job: Job, answer) -> None:
        if self.outage_since is not None:  # ...and once when they end
            self.say(f"replication to {self.storage.root} works again after "
                     f"{time.monotonic() - self.outage_since:.0f}s of failures "
                     f"(step {job.step}, {job.phase} done)")
            self.outage_since = None
        if job.phase == "prepare":
            job.target, job.phase = answer, "upload"
        elif job.phase == "upload":
            job.phase = "commit"
        else:
            self._done(job, answer)
            return
        job.attempts, job.failing_since = 0, None
        self._run(job)

    def _done(self, job: Job, size: int) -> None:
        self.durable_step = max(self.durable_step, job.step)
        seconds = time.perf_counter() - job.t0
        self.log("replication", step=job.step, path=self.durable.dir.step_path(job.step),
                 seconds=seconds, bytes=size, mb_per_s=size / seconds / 1e6)
        self.say(f"step {job.step:6d} | replicated to {self.durable.dir.step_path(job.step)} "
                 f"({seconds:.2f}s, {size:,} bytes)")
        self.job, waiting, self.waiting = None, self.waiting, None
        if waiting is not None:
            self._start(waiting)

    def _start(self, job: Job) -> None:
        job.t0 = time.perf_counter()
        self.job, self.waiting = job, None
        self._run(job)

    def _run(self, job: Job) -> None:
        """Start (again) the job's phase on this rank; a phase with nothing to do on this
        rank is done at once."""
        job.attempts += 1
        job.error = None
        work = {"prepare": self._prepare, "upload": self._upload, "commit": self._commit}
        if job.phase == "upload" or self.rank == 0:
            self.future = self.pool.submit(work[job.phase], job)
        else:
            self.future = None

    # ------------------------------------------------------------------ the phases
    def _prepare(self, job: Job) -> str:
        if self.before_prepare is not None:
            self.before_prepare()
        return self.durable.target_dir(self.durable.dir.step_path(job.step))

    def _upload(self, job: Job) -> str:
        mine = sorted(job.per_rank[self.rank])
        if self.storage.is_local:
            os.makedirs(job.target, exist_ok=True)
        if mine:
            self.storage.fs.put([os.path.join(job.src, n) for n in mine],
                                [posixpath.join(job.target, n) for n in mine])
        fault_point("mid_replication", self.rank, job.step)
        there = self.storage.find(job.target)
        wrong = [n for n in mine if there.get(n) != job.per_rank[self.rank][n][0]]
        if wrong:
            raise OSError(f"uploaded files {wrong[:3]} do not have the local sizes")
        return job.target

    def _commit(self, job: Job) -> int:
        """The durable commit (protocol.py); a retry that finds this very manifest already
        committed (an attempt failed after its commit point) only redoes `latest` and
        retention."""
        final = self.durable.dir.step_path(job.step)
        files = {n: v for d in job.per_rank for n, v in d.items()}
        manifest = M.build(job.step, len(job.per_rank), files, job.checksum)
        there = posixpath.join(final, MANIFEST)
        committed = (job.attempts > 1 and self.storage.exists(there)
                     and self.storage.read_bytes(there) == manifest)
        if not committed:
            return self.durable.commit(job.target, final, job.step, job.per_rank,
                                       checksum=job.checksum)
        self.durable.advance(job.step)
        return sum(size for size, _ in files.values())

    # ------------------------------------------------------------------ the end
    def steps(self) -> set[int]:
        return {j.step for j in (self.job, self.waiting) if j is not None}

    def finish(self, attempts: int = 3) -> None:
        """Collective: drive the job in flight (and one waiting) to the end; after `attempts`
        failed attempts of a phase, leave it on the local tier with a WARNING line."""
        while self.job is not None:
            self.advance(D.agree(self.report, every_rank=True))
            job = self.job
            if job is not None and job.error is not None and job.attempts >= attempts:
                self.say(f"WARNING: step {job.step} was not replicated to "
                         f"{self.storage.root}; it is on the local tier only, and the next "
                         "--auto_resume run resumes from it and replicates it")
                self.job = None
                if self.waiting is not None:
                    self._start(self.waiting)
            time.sleep(0.05)
        self.pool.shutdown(wait=True)
