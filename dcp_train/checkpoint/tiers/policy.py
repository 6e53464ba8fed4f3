"""When to save on which tier, and which tier to resume from (the manager's policy for two
tiers; the tiers themselves are tiers/local.py and replicate.py).

Intervals. A tier saves when its step interval is due (--checkpoint_interval,
--local_checkpoint_interval) or when its wall-time interval has passed since its last save
(--checkpoint_interval_minutes, --local_checkpoint_interval_minutes; counted from the end of
the resume for the first). Rank 0's clock decides: its answer travels in the one gather
train/loop.py does per step, so every rank saves after the same step. A save due on the durable
tier with a local tier configured is one save: local commit, then replication.

Resume (--auto_resume). The newest checkpoint that is complete on either tier: the local
step every rank can load from its own node (tiers.LocalTier.usable, agreed over all ranks)
when it is at least as new as the durable tier's (at the same step the local one is nearer),
else the durable one. The reason goes to the console and the `resume` record.
"""

from __future__ import annotations

import time
from typing import NamedTuple

TIERS = ("durable", "local")


class TierChoice(NamedTuple):
    """With a local tier: the tier a resume loaded from, and why (the `resume` record)."""

    tier: str  # "local" or "durable"
    reason: str


class Clock:
    """The wall-time intervals, in minutes, of both tiers (0: off)."""

    def __init__(self, cfg):
        self.minutes = {"durable": cfg.checkpoint.checkpoint_interval_minutes,
                        "local": cfg.checkpoint.local_checkpoint_interval_minutes}
        self.start()

    @property
    def enabled(self) -> bool:
        return any(m > 0 for m in self.minutes.values())

    def start(self) -> None:
        self.last = {t: time.monotonic() for t in TIERS}

    def due(self) -> tuple[bool, bool]:
        """(durable due, local due) by this process's clock (used on rank 0 only)."""
        now = time.monotonic()
        return tuple(self.minutes[t] > 0 and now - self.last[t] >= 60 * self.minutes[t]
                     for t in TIERS)

    def saved(self, *tiers: str) -> None:
        for t in tiers:
            self.last[t] = time.monotonic()


def common_step(usable: list[dict]) -> int:
    """The newest local step every rank can load (-1: none); usable: every rank's
    {step: None or problem}."""
    sets = [{s for s, p in u.items() if p is None} for u in usable]
    return max(set.intersection(*sets), default=-1) if sets else -1


def choose(usable: list[dict], nodes: list[int], durable_step: int) -> tuple[bool, str]:
    """(resume from the local tier?, why, in words)."""
    best = common_step(usable)
    if best >= 0 and best >= durable_step:
        if durable_step < 0:
            return True, f"local step {best} is on every node; the durable tier has none"
        return True, (f"local step {best} is on every node, " + (
            f"newer than the durable tier's step {durable_step}" if best > durable_step
            else "the same step as the durable tier's, and nearer"))
    newest = max((s for u in usable for s in u), default=-1)
    if newest < 0:
        why = "the local tier holds no checkpoint"
    elif newest <= durable_step or best >= durable_step:
        why = f"the durable tier's step {durable_step} is at least as new as the local tier's"
    else:
        rank, problem = next((r, u.get(newest, "not there")) for r, u in enumerate(usable)
                             if u.get(newest, "not there") is not None)
        why = (f"local step {newest} is not usable by rank {rank} (node {nodes[rank]}): "
               f"{problem}")
    return False, why
