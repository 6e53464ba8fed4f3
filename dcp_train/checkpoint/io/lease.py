"""One writer per checkpoint directory: a lease file that a crashed run does not leave stuck.

Rank 0 holds `<checkpoint_dir>/writer.lease`, JSON {run_id, host, pid, heartbeat, timeout_s},
and refreshes its heartbeat while training. A new run may take the lease over when

- the lease belongs to the same run (`run_id`: DCP_TRAIN_RUN_ID, else SLURM_JOB_ID, else
  torchrun's TORCHELASTIC_RUN_ID, i.e. its --rdzv_id): an elastic restart or a SLURM requeue;
- the holder is on this host and its pid is gone (a crash or SIGKILL): at once;
- its heartbeat is older than its timeout (a holder on another host that died). The timeout is
  the holder's --stall_timeout (`timeout_s`, written into the lease; it renews the heartbeat
  every timeout/4 seconds at step boundaries and commits). A lease of another host younger
  than that, expiring within this run's own --stall_timeout, is waited out (`expiry_wait`:
  every rank sleeps that long, outside any collective, then `check` reads it again) and said
  once: a relaunch after a dead job (a pod restarted on another node) is blocked no longer
  than the stall timeout and is not refused. If the heartbeat moved meanwhile, the holder is
  alive and `check` refuses.

Otherwise the run stops with an error naming the holder and how to override (delete the file).
The lease file is replaced atomically, but neither local files nor fsspec object stores give us
a compare-and-swap here, so two runs started at the same instant could both win: the lease
guards against mistakes (a second job on the same directory), not against a deliberate race.

On an object store the renewal runs on a thread of its own (`_keep`), started by `acquire`:
the training thread never waits for the bucket (a silent or refusing bucket used to stop the
loop inside `refresh`). Every renewal is one PUT with the store's timeouts
(store/options.py); a renewal that fails is one WARNING when the failures start and one line
when a renewal succeeds again, and `refresh` (called every step and at commits) only wakes the
thread. `release` stops it (waiting at most one read timeout's worth, `STOP_WAIT_S`) first.

Requests on an object store: `check` one GET (a missing lease is a 404, no HEAD first),
`acquire` one PUT (and a GET unless `check` ran within timeout/4 seconds; `expiry_wait`'s
GET serves the `check` after it unless it waited), `refresh` one PUT
at most every timeout/4 seconds, `release` a GET and a DELETE.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from dcp_train.checkpoint.io.names import LEASE
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.errors import CheckpointError, describe

STOP_WAIT_S = 5.0  # how long `release` waits for a renewal in flight

class LeaseError(CheckpointError):
    """Another live run holds the lease: the line says which and what to do."""


def run_id() -> str:
    for var in ("DCP_TRAIN_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        # plain `torchrun --nproc_per_node=N` (no --rdzv_id) sets TORCHELASTIC_RUN_ID=none for
        # every job: that names no run, and would let a second job take a live run's lease
        if os.environ.get(var) and os.environ[var] != "none":
            return f"{var}={os.environ[var]}"
    return f"pid={os.getpid()}-{uuid.uuid4().hex[:8]}"


class WriterLease:
    def __init__(self, storage: Storage, timeout_s: float = 300.0, say=None):
        """timeout_s: --stall_timeout; say(text): where the line about waiting goes."""
        self.storage = storage
        self.say = say if say is not None else (lambda text: None)
        self.path = storage.join(LEASE)
        self.timeout_s = timeout_s
        self.mine = {"run_id": run_id(), "host": socket.gethostname(), "pid": os.getpid()}
        self._last_refresh = 0.0
        self._checked_at = None  # time.monotonic() of the last check()
        self._peeked = []  # [the lease expiry_wait read], for the check right after it
        self._keeper: threading.Thread | None = None  # object stores: renews (module doc)
        self._wake, self._stop = threading.Event(), threading.Event()

    def acquire(self) -> None:
        """Take the lease: LeaseError if another live run holds it. Reads it again unless
        check() did within timeout/4 seconds."""
        if self._checked_at is None or \
                time.monotonic() - self._checked_at > self.timeout_s / 4:
            self.check()
        self._write()
        if not self.storage.is_local and self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, daemon=True,
                                            name="dcp_train-lease")
            self._keeper.start()

    def check(self) -> None:
        """LeaseError if another run that is alive holds the lease (reads only)."""
        self._checked_at = time.monotonic()
        holder = self._peeked.pop() if self._peeked else self._read()
        if holder is not None and self._alive(holder):
            raise LeaseError(
                f"checkpoint dir {self.storage.root} is in use by run {holder.get('run_id')} "
                f"(pid {holder.get('pid')} on {holder.get('host')}, heartbeat "
                f"{time.time() - holder.get('heartbeat', 0):.0f}s ago); use another "
                f"--checkpoint_dir, or if that run is dead delete {self.path}")

    def refresh(self) -> None:
        """Renew the heartbeat, at most every timeout/4 seconds (cheap to call every step);
        on an object store only a nudge to the renewing thread, which never blocks."""
        if time.time() - self._last_refresh > self.timeout_s / 4:
            if self._keeper is not None:
                self._wake.set()
            else:
                self._write()

    def _keep(self) -> None:
        """The renewing thread: a PUT every timeout/4 seconds (or when nudged), its failures
        said once when they start and once when they end."""
        failing_since = None
        while not self._stop.is_set():
            self._wake.wait(self.timeout_s / 4)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._write()
            except Exception as e:
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.say(f"WARNING: renewing the writer lease {self.path} failed: "
                             f"{describe(e)}; training goes on, the lease is renewed again "
                             f"every {self.timeout_s / 4:g}s")
                continue
            if failing_since is not None:
                self.say(f"the writer lease {self.path} is renewed again, after "
                         f"{time.monotonic() - failing_since:.0f}s of failures")
                failing_since = None

    def release(self) -> None:
        if self._keeper is not None:
            self._stop.set()
            self._wake.set()
            self._keeper.join(STOP_WAIT_S)
            if self._keeper.is_alive():  # a renewal still in flight could land after a delete
                self.say(f"WARNING: {self.path} left in place: a renewal did not end within "
                         f"{STOP_WAIT_S:.0f}s; it expires after --stall_timeout")
                return
        holder = self._read()
        if holder is not None and all(holder.get(k) == v for k, v in self.mine.items()):
            self.storage.rm_file(self.path)

    def _alive(self, holder: dict) -> bool:
        if holder.get("run_id") == self.mine["run_id"]:
            return False  # our own run, restarted
        if holder.get("host") == self.mine["host"]:
            return _pid_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) < float(holder.get("timeout_s", 0))

    def expiry_wait(self) -> float:
        """Seconds to wait before `check`: for a lease of another host that looks alive and
        expires within this run's timeout, the time until it expires (said once through
        `say`); else 0 (none, stale, ours, a live one that `check` refuses, or a lease that
        could not be read: the probe reports that)."""
        try:
            holder = self._read()
        except Exception:  # a store outage: the probe and discovery ride it out or report it
            return 0.0
        if holder is None or not self._alive(holder) or holder.get("host") == self.mine["host"]:
            self._peeked[:] = [holder]  # check() needs no second GET
            return 0.0
        beat = float(holder.get("heartbeat", 0))
        left = beat + float(holder.get("timeout_s", 0)) - time.time()
        if left > self.timeout_s:
            return 0.0
        self.say(f"checkpoint dir {self.storage.root}: the writer lease of run "
                 f"{holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}) "
                 f"was renewed {time.time() - beat:.0f}s ago; waiting {left:.0f}s for it to "
                 "expire (a live run renews it; a dead one's expires)")
        return max(0.0, left) + 0.5

    def _read(self) -> dict | None:
        try:
            data = self.storage.read_optional(self.path)
            return None if data is None else json.loads(data)
        except (ValueError, OSError):
            return None  # unreadable: treat as no lease

    def _write(self) -> None:
        self._last_refresh = time.time()
        record = {**self.mine, "heartbeat": self._last_refresh, "timeout_s": self.timeout_s}
        self.storage.write_atomic(self.path, json.dumps(record).encode())


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        with open(f"/proc/{pid}/status") as f:
            return not any(l.startswith("State:") and "Z" in l.split()[1] for l in f)
    except OSError:
        return True
