"""Riding out a store outage, one protocol phase at a time, within --store_retry_budget.

    patience = Patience(budget_s=600, stall_s=300)
    target = agreed_phase(pick_dir, patience, "s3://bucket/run", "the save of step 6")
    # the same as ride_out(lambda: D.agree(guarded(pick_dir)), patience, ...)

Each request already has timeouts and the client's own retries (store/options.py); a phase
that still fails (a burst of 503 SlowDown longer than the client's backoff, an endpoint that is
down or silent) is run again here, after an exponential backoff with jitter, until:

- it succeeds: ride_out returns its result;
- the store refused it (any answer, a 503 or a refused or reset connection) for longer than
  `budget_s` since the phase's first failure: StoreUnavailable naming the store, the phase,
  the step and the last error;
- the store did not answer at all (every failure a timeout) for `stall_s`, or would not before
  the next attempt ends (one attempt takes about as long as the last one did):
  StoreUnavailable "<store> did not answer for N s during <what>".

`guarded(fn)` turns a transient store failure raised by fn (store/errors.py classifies it
where it is raised, by the store's answer or the exception's type; a few words are the last
resort for what arrives untyped) into StoreTrouble, which survives distributed.agree (pickled
with whether it was silence), and a permanent one (denied, no such bucket, a bad request) into
its StoreError, one line naming the store (exit 2); other errors pass through unchanged,
and are never retried. Collective (the default): every rank calls ride_out at the same point
around an attempt whose failures are agreed (distributed.agree), and rank 0's clock decides
for all whether to retry or give up, so no rank retries or waits alone. collective=False: a
phase of one process only (rank 0's clock is then its own).

Re-running a phase must be safe, which the save protocol makes it: a write puts the same bytes
under the same names, the manifest PUT stays the commit point, `latest` and retention are
idempotent. With budget_s == 0 there is no retry: the first failure gives up.
"""

from __future__ import annotations

import random
import time
from typing import NamedTuple

from dcp_train import distributed as D
from dcp_train.store import errors as store_errors
from dcp_train.errors import CheckpointError, StoreUnavailable, chain, classify, describe

MAX_DELAY_S = 30.0  # the longest backoff between two attempts
_JITTER = random.Random()  # its own generator: the global one is checkpointed state (rng.py)
# Last resort (store_errors.classify types failures where they are raised): words of a
# store failure that reached here untyped, pickled without its cause
_REFUSED_TEXT = ("reduce your request rate", "SlowDown", "Could not connect to the endpoint",
                 "Connection was closed before we received a valid response",
                 # a server error (500, 502, 504), retryable by S3's and GCS's documentation;
                 # s3fs raises OSError(EREMOTEIO, "Internal Server Error") for a 500
                 "Internal Server Error", "InternalError", "We encountered an internal error",
                 "Bad Gateway", "Gateway Timeout", "Backend Error", "backendError")
_SILENT_TEXT = ("Read timeout on endpoint", "Connect timeout on endpoint")


class Patience(NamedTuple):
    budget_s: float = 0.0  # --store_retry_budget
    stall_s: float = 300.0  # --stall_timeout


class StoreTrouble(CheckpointError):
    """A phase failed with a transient store error; `silent`: it was a timeout (no answer)."""

    def __init__(self, message: str, silent: bool = False):
        super().__init__(message)
        self.silent = silent

    def __reduce__(self):
        return type(self), (str(self), self.silent)


def trouble(exc: BaseException) -> StoreTrouble | None:
    """StoreTrouble for a transient store failure (anywhere in exc's chain), else None.
    Judged by store_errors.classify (the store's answer or the exception's type, where it
    was raised); the words below only for what reaches here untyped (last resort)."""
    if isinstance(exc, StoreTrouble):
        return exc
    typed = store_errors.classify(exc)
    if typed is not None:
        return StoreTrouble(_text(exc), typed.silent) if typed.transient else None
    kind, _ = classify(exc)
    found = chain(exc)
    words = " ".join(str(e) for e in found)
    silent = any(t in words for t in _SILENT_TEXT)
    if kind not in ("unreachable", "throttled") and not silent and not any(
            t in words for t in _REFUSED_TEXT):
        return None
    return StoreTrouble(_text(exc), silent)


def _text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CheckpointError) else describe(exc)


def guarded(fn):
    """fn, raising StoreTrouble instead of a transient store failure, and the StoreError
    (exit 2, one line naming the store) for a permanent one."""
    def run():
        try:
            return fn()
        except StoreTrouble:
            raise
        except Exception as e:
            found = trouble(e)
            if found is not None:
                raise found from e
            typed = store_errors.classify(e)
            if typed is not None and not typed.transient and typed is not e:
                raise typed from e
            raise
    return run


# the phase of a fresh start (no --resume/--auto_resume) looking at its checkpoint dir: no
# checkpoint of it is at stake, so giving up says so
FRESH = "the start of a fresh run (checking --checkpoint_dir)"

class _Clock:
    """Rank 0's account of one phase's failures (module docstring)."""

    def __init__(self, patience: Patience, store: str, what: str):
        self.patience, self.store, self.what = patience, store, what
        self.first = None  # time.monotonic() of the first failure
        self.silent_s = 0.0  # consecutive seconds without an answer
        self.tries = 0

    def verdict(self, e: StoreTrouble, attempt_s: float, since_last_s: float) -> float | str:
        """Seconds to wait before the next attempt, or the words of giving up."""
        now = time.monotonic()
        self.first = now - attempt_s if self.first is None else self.first
        self.silent_s = self.silent_s + since_last_s if e.silent else 0.0
        self.tries += 1
        budget, stall = self.patience
        then = ("nothing was written, relaunch once the store answers" if self.what == FRESH
                else "the last committed checkpoint is intact, relaunch with --auto_resume "
                     "once the store answers")
        if e.silent and self.silent_s + attempt_s > stall:
            return (f"{self.store} did not answer for {self.silent_s:.0f} s during {self.what} "
                    f"(--stall_timeout {stall:g}): {e}; {then}")
        left = budget - (now - self.first)
        if left <= 0:
            return (f"{self.store} refused requests for {now - self.first:.0f} s during "
                    f"{self.what}, past --store_retry_budget {budget:g} s: {e}; {then}")
        delay = min(MAX_DELAY_S, 2.0 ** (self.tries - 1)) * _JITTER.uniform(0.5, 1.0)
        delay = max(0.1, min(delay, left))
        print(f"WARNING: {self.store} failed during {self.what} (attempt {self.tries}): {e}; "
              f"retrying in {delay:.1f}s ({left:.0f}s of --store_retry_budget left)",
              flush=True)
        return delay


def ride_out(attempt, patience: Patience, store: str, what: str, collective: bool = True):
    """attempt()'s result, attempt() run again after a StoreTrouble as the module docstring
    says; StoreUnavailable past the budget or the stall timeout."""
    clock = _Clock(patience, store, what)
    last = time.monotonic()
    while True:
        started = time.monotonic()
        try:
            return attempt()
        except StoreTrouble as e:
            ended = time.monotonic()
            decide = lambda e=e: clock.verdict(e, ended - started, ended - last)  # noqa: E731
            verdict = D.agree(decide) if collective else decide()
            last = ended
        if isinstance(verdict, str):
            error = StoreUnavailable(verdict)
            error.origin_rank = 0  # every rank raises it alike: rank 0 says it
            raise error
        time.sleep(verdict)


def agreed_phase(fn, patience: Patience, store: str, what: str, every_rank: bool = False):
    """One collective phase, the way the save and the resume run each of theirs: fn on rank 0
    (on every rank with every_rank, then the list of their results), its result and failures
    agreed (distributed.agree), a transient store failure ridden out (ride_out)."""
    return ride_out(lambda: D.agree(guarded(fn), every_rank=every_rank), patience, store, what)
