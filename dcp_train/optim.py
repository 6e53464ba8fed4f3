"""AdamW as in build-nanogpt (betas 0.9/0.95, eps 1e-8, decay on 2-D params) and the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str):
    """AdamW with weight decay on parameters with dim >= 2 only; fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=(device_type == "cuda") or None)


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of the update that makes `step` (1-based: the s-th update).

    Linear warmup over the first `warmup_steps` updates, then cosine from max_lr down to
    10% of max_lr at `max_steps` (build-nanogpt's get_lr, with it = step - 1).
    """
    it = step - 1
    min_lr = max_lr * 0.1
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it >= max_steps or max_steps <= warmup_steps:
        return min_lr
    ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# ---------------------------------------------------------------- the schedule across resumes
# A run's LR schedule is the dict {"max_lr", "warmup_steps", "max_steps"} (lr_at's arguments;
# max_steps is where the cosine ends). The schedule in effect is stored in every checkpoint
# (meta["lr_schedule"]), so a chain of resumes keeps using the one the run started with.
SCHEDULE_POLICIES = ("continue", "recompute")


def schedule_of(max_lr: float, warmup_steps: int, max_steps: int) -> dict:
    return {"max_lr": max_lr, "warmup_steps": warmup_steps, "max_steps": max_steps}


def saved_schedule(meta: dict) -> dict:
    """The schedule a checkpoint's run used: its meta["lr_schedule"], or for checkpoints
    written before it was stored, the one its config implies."""
    if "lr_schedule" in meta:
        return dict(meta["lr_schedule"])
    c = meta["config"]
    return schedule_of(c["max_lr"], c["warmup_steps"], c["max_steps"])


def schedule_for_launch(saved: dict | None, max_lr: float, warmup_steps: int,
                        max_steps: int, policy: str = "continue") -> dict:
    """The schedule this launch uses (and stores in its checkpoints). Pure.

    saved: the checkpoint's schedule (`saved_schedule`), None for a fresh start.
    - fresh start, or policy "recompute": the flags' schedule. Extending a run this way
      refits the cosine to the new --max_steps: the LR jumps up at the resume step.
    - policy "continue" (default): the cosine keeps ending at the saved run's max_steps
      (then the LR stays at its floor, 10% of max_lr), whatever --max_steps now says; so the
      LR never jumps, and every step the two runs share gets the LR the saved run would have
      used. --max_lr and --warmup_steps come from the flags (a change of those is the user's
      explicit request and is reported as a change).
    """
    if policy not in SCHEDULE_POLICIES:
        raise ValueError(f"policy must be one of {SCHEDULE_POLICIES}, got {policy!r}")
    if saved is None or policy == "recompute":
        return schedule_of(max_lr, warmup_steps, max_steps)
    return schedule_of(max_lr, warmup_steps, int(saved["max_steps"]))


def lr_of(step: int, schedule: dict) -> float:
    """The LR of update `step` under `schedule` (lr_at with the schedule's arguments)."""
    return lr_at(step, schedule["max_lr"], schedule["warmup_steps"], schedule["max_steps"])
