"""When to save on which tier, and which tier to resume from (the manager's policy for two
tiers; the tiers themselves are tiers.py and replicate.py).

Intervals. A tier saves when its step interval is due (--checkpoint_interval,
--local_checkpoint_interval) or when its wall-time interval has passed since its last save
(--checkpoint_interval_minutes, --local_checkpoint_interval_minutes; counted from the end of
the resume for the first). Rank 0's clock decides: its answer travels in the one gather
train.py does per step, so every rank saves after the same step. A save due on the durable
tier with a local tier configured is one save: local commit, then replication.

Resume (--auto_resume). The newest checkpoint that is complete on either tier: the local
step every rank can load from its own node (tiers.LocalTier.usable, agreed over all ranks)
when it is at least as new as the durable tier's (at the same step the local one is nearer),
else the durable one. The reason goes to the console and the `resume` record.
"""

from __future__ import annotations

import os
import time

from dcp_train.config import ConfigError

TIERS = ("durable", "local")
PLACEHOLDER = "{node}"


def local_path(template: str, node: int) -> str:
    """--local_checkpoint_dir of node `node`: `{node}` replaced by its rank, made absolute."""
    return os.path.abspath(template.replace(PLACEHOLDER, str(node)))


class Clock:
    """The wall-time intervals, in minutes, of both tiers (0: off)."""

    def __init__(self, cfg):
        self.minutes = {"durable": cfg.checkpoint_interval_minutes,
                        "local": cfg.local_checkpoint_interval_minutes}
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


def validate(cfg) -> None:
    """Flag checks of both tiers (config.validate calls this); one-line ConfigErrors."""
    if cfg.checkpoint_interval < 0 or cfg.local_checkpoint_interval < 0:
        raise ConfigError("--checkpoint_interval and --local_checkpoint_interval must be >= 0")
    for flag in ("keep_last_n_checkpoints", "keep_last_n_local_checkpoints"):
        if getattr(cfg, flag) == 0 or getattr(cfg, flag) < -1:
            raise ConfigError(f"--{flag} must be -1 (keep all) or >= 1")
    for flag in ("checkpoint_interval_minutes", "local_checkpoint_interval_minutes"):
        if not getattr(cfg, flag) >= 0:
            raise ConfigError(f"--{flag} must be >= 0 (0: off), got {getattr(cfg, flag)}")
    local = cfg.local_checkpoint_dir
    if not local:
        if cfg.local_checkpoint_interval or cfg.local_checkpoint_interval_minutes:
            raise ConfigError("--local_checkpoint_interval(_minutes) needs "
                              "--local_checkpoint_dir PATH")
        return
    if "://" in local:
        raise ConfigError(f"--local_checkpoint_dir must be a node-local path, not a URL "
                          f"({local}); the durable tier is --checkpoint_dir")
    durable = cfg.checkpoint_dir.removeprefix("file://")
    if "://" not in durable and local_path(local, 0) == os.path.abspath(durable):
        raise ConfigError("--local_checkpoint_dir is --checkpoint_dir; give the local tier "
                          "its own node-local dir")
    if cfg.async_checkpoint:
        raise ConfigError("--async_checkpoint and --local_checkpoint_dir: the durable copy is "
                          "already made in the background; drop --async_checkpoint")
