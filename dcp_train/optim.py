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
