"""Preemption: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) stops the run at the next step boundary with
a checkpoint.

- The first signal only sets a flag. After every step all ranks combine their flags (one tiny
  all-reduce), so they agree on the same stopping step even if only one rank got the signal;
  they save a checkpoint of that step and exit with EXIT_PREEMPTED.
- A second signal, or `--preempt_timeout` seconds after the first, exits at once without a
  checkpoint (exit code 128 + signal number), for when the save cannot finish in time.
  `--preempt_timeout 0` sets no limit: only a second signal exits without a checkpoint (a
  negative value is refused at parse time, config.py).

torchrun forwards SIGTERM and SIGINT to its workers and waits up to 30 s before killing them (a
Ctrl-C in the terminal reaches torchrun only: the workers run in sessions of their own); SLURM
sends SIGUSR1 ahead of a time limit with `--signal=USR1@SECONDS` (see launch/slurm.sbatch).
SIGINT replaces Python's KeyboardInterrupt from the moment Preemption is installed: a Ctrl-C
never unwinds the loop half-way through a step or a save.

One line per job (docs/errors.md): torchrun forwards a signal to every rank, and only the
speaker (rank 0) says `dcp_train: got SIGINT: ...`, at once; if only other ranks got it, rank 0
says it (naming the rank) when the ranks agree on the stop after the step (`agreed`). A
second signal or the timeout is said by the speaker too; the other ranks exit quietly with
the same code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self, timeout_s: float, speaker: bool = True):
        self.timeout_s = timeout_s
        self.speaker = speaker  # rank 0: the one that prints (module docstring)
        self.announced = False
        self.signum: int | None = None
        self._pid = os.getpid()
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker inherited this handler (torchrun signals the rank's
            # whole process group): its rank decides and ends it
            return
        if self.signum is not None:  # second signal: no more waiting
            _exit_now(signum, "second signal", self.speaker)
        self.signum = signum
        if self.speaker:
            self._announce(signum, "")
        if self.timeout_s <= 0:
            return
        timer = threading.Timer(self.timeout_s, _exit_now,
                                (signum, "--preempt_timeout", self.speaker))
        timer.daemon = True
        timer.start()

    def agreed(self, signals: list[int]) -> bool:
        """Whether the ranks stop, from every rank's signal number (0 for none) as gathered
        after a step; if so the speaker says it, naming the rank when it got none itself
        (module docstring)."""
        rank = next((r for r, s in enumerate(signals) if s), None)
        if self.speaker and rank is not None:
            self._announce(signals[rank], f" (rank {rank})")
        return rank is not None

    def _announce(self, signum: int, who: str) -> None:
        if self.announced:
            return
        self.announced = True
        limit = f" or {self.timeout_s:g}s" if self.timeout_s > 0 else ""
        print(f"dcp_train: got {signal.Signals(signum).name}{who}: stopping after this step "
              f"with a checkpoint (a second signal{limit} exits without one)",
              file=sys.stderr, flush=True)


def _exit_now(signum: int, why: str, speaker: bool = True) -> None:
    if speaker:
        print(f"dcp_train: {why}: exiting without a checkpoint", file=sys.stderr, flush=True)
    os._exit(128 + signum)
