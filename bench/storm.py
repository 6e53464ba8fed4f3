"""The failure storm of bench/goodput.py: a seeded schedule, and the injectors that make each
failure happen to a real job.

    plan = schedule(seed=1, minutes=4, stall_timeout=10)  # [Failure(at=..., kind=..., ...)]

The schedule depends only on (seed, minutes, stall_timeout): the storm over our two-tier run and
the one over the baseline are the same failures at the same offsets from the job's start.
Kinds (KINDS):

- `rank_kill`: SIGKILL of one worker (rank `rank`); torchrun's `--max-restarts` restarts the group.
- `node_loss`: the whole "node" lost: the torchrun agent and every worker SIGKILLed, its local tier
  wiped (its disk is gone with it); the supervisor relaunches, as a SLURM requeue would.
- `bucket`: the bucket behind the fault proxy answers every request with `detail` (503 SlowDown,
  503 ServiceUnavailable, 500 InternalError, 400 RequestTimeout: S3's documented retryable
  answers) for
  `seconds`, or (`detail` "silent") accepts requests and never answers, for 1.5 x
  `--stall_timeout` (longer than one request's share of the retry budget).
- `rank_stop`: SIGSTOP of one worker (a hung rank); ended by `--stall_timeout` -> exit 69.
- `disk_full`: the local tier's filesystem (a tmpfs of its own) filled to the last block for
  `seconds`, then freed (an operator, or the log rotation that filled it).

Slots: the storm's `minutes` are cut into equal slots, one failure in each at a seeded offset
inside the middle 60% of the slot; the kinds are a seeded shuffle of KINDS, repeated, so the
first five failures are five different kinds.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field

from bench.common import REPO

sys.path.insert(0, str(REPO / "tests"))  # tests/ is not a package: the test servers by name
from fault_proxy import ANSWERS  # noqa: E402

KINDS = ("rank_kill", "node_loss", "bucket", "rank_stop", "disk_full")
# S3's retryable answers (docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html),
# as tests/fault_proxy.py sends them
BUCKET_ANSWERS = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")
assert all(a in ANSWERS for a in BUCKET_ANSWERS)
FAILURES_PER_MINUTE = 1.25
BUCKET_SECONDS = 20.0
DISK_FULL_SECONDS = 15.0
PROCESS_KINDS = ("rank_kill", "node_loss", "rank_stop")  # kinds that end a process


@dataclass
class Failure:
    at: float          # seconds after the job's first launch (scheduled)
    kind: str
    rank: int = 0      # rank_kill, rank_stop
    detail: str = ""   # bucket: an S3 error code of BUCKET_ANSWERS, or "silent"
    seconds: float = 0.0  # bucket, disk_full: how long it lasts
    injected: float | None = None  # Unix time it was injected (None: not reached)
    effect: str = ""   # what the injector did, in words
    info: dict = field(default_factory=dict)  # measurements added by the analysis

    def as_dict(self) -> dict:
        return asdict(self)


def schedule(seed: int, minutes: float, stall_timeout: float) -> list[Failure]:
    """The seeded storm: round(minutes x FAILURES_PER_MINUTE) failures (at least 4)."""
    rng = random.Random(seed)
    n = max(4, round(minutes * FAILURES_PER_MINUTE))
    kinds: list[str] = []
    while len(kinds) < n:
        block = list(KINDS)
        rng.shuffle(block)
        kinds += block
    slot = minutes * 60 / n
    out = []
    for i, kind in enumerate(kinds[:n]):
        f = Failure(at=slot * (i + rng.uniform(0.2, 0.8)), kind=kind, rank=rng.randrange(2))
        if kind == "bucket":
            f.detail = rng.choice([*BUCKET_ANSWERS, "silent"])
            f.seconds = 1.5 * stall_timeout if f.detail == "silent" else BUCKET_SECONDS
        elif kind == "disk_full":
            f.seconds = DISK_FULL_SECONDS
        out.append(f)
    return out


def _kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def wipe(directory: str) -> None:
    """Everything under `directory` removed, the directory (a mount point) kept."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


class Injector:
    """Makes a Failure happen to a job (bench/supervisor.Job) and undoes the timed ones."""

    def __init__(self, proxy, local_dir: str | None):
        self.proxy, self.local_dir = proxy, local_dir
        self.filler = None
        self.until = 0.0  # time.time() when the timed failure in force ends

    def inject(self, f: Failure, job, now: float) -> None:
        f.injected = now
        if f.kind in ("rank_kill", "rank_stop"):
            pid = job.worker_of_rank(f.rank)
            sig = signal.SIGKILL if f.kind == "rank_kill" else signal.SIGSTOP
            ok = pid is not None and _kill(pid, sig)
            f.effect = f"{signal.Signals(sig).name} rank {f.rank} (pid {pid})" if ok else \
                "no such rank alive"
        elif f.kind == "node_loss":
            job.kill_node()
            if self.local_dir:
                wipe(self.local_dir)
            f.effect = "agent and workers SIGKILLed" + (", local tier wiped" if self.local_dir
                                                         else "")
        elif f.kind == "bucket":
            if f.detail == "silent":
                self.proxy.fault("hang", f.seconds)
            else:
                self.proxy.fault("answer", f.seconds, answer=f.detail)
            self.until = now + f.seconds
            f.effect = f"bucket {f.detail} for {f.seconds:.0f} s"
        elif f.kind == "disk_full":
            f.effect = self._fill() if self.local_dir else "no local tier: nothing to fill"
            self.until = now + f.seconds if self.filler else now

    def _fill(self) -> str:
        st = os.statvfs(self.local_dir)
        free = st.f_bavail * st.f_frsize
        self.filler = os.path.join(self.local_dir, "disk-full.filler")
        with open(self.filler, "wb") as out:
            try:
                os.posix_fallocate(out.fileno(), 0, free)
            except OSError:  # filled to the last block, whatever fallocate managed
                pass
        return f"local tier filled ({free / 1e6:.0f} MB)"

    def busy(self, now: float) -> bool:
        """A timed failure (bucket, disk full) is still in force."""
        return now < self.until

    def heal(self, now: float) -> None:
        """End the timed failures whose time is up (the proxy heals its own faults)."""
        if self.filler and now >= self.until:
            if os.path.exists(self.filler):
                os.unlink(self.filler)
            self.filler = None

    def close(self) -> None:
        self.until = 0.0
        self.heal(float("inf"))
        self.proxy.heal()
