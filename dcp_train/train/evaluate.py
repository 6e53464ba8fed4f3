"""Validation loss, and the small helpers every evaluation shares.

The model may be a plain module in one process, or an FSDP2 (`fully_shard`) module under
torch.distributed. Two rules keep the second case from deadlocking or drifting:

- every forward of an FSDP2 model is a collective (it all-gathers parameters), so every rank
  calls forward the same number of times; evaluations pad with dummy forwards when a rank
  runs out of real work;
- evaluations never draw from the global torch / numpy / python RNGs (the trainer's
  bit-exact resume depends on them), and restore the model's train/eval mode afterwards.

Reductions use SUM all_reduce (gloo has no AVG) of tensors on the model's device, and only when
torch.distributed is initialized.

Mixed precision: with FSDP2 the dtypes come from its MixedPrecisionPolicy, so no
`torch.autocast` is needed (nor wanted) here and `val_loss` simply runs forward. For a plain
model that should run under autocast, pass `autocast=lambda: torch.autocast("cuda",
dtype=torch.bfloat16)`: a factory that returns a fresh context manager for each forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def distributed_ready() -> bool:
    """True when reductions over ranks are possible (and needed)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """SUM all_reduce in place when torch.distributed is initialized; a no-op otherwise."""
    if distributed_ready():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() and torch.no_grad() inside; the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def block_size_of(model: nn.Module) -> Optional[int]:
    """The model's maximum sequence length (`model.config.block_size`), or None if unknown.

    fully_shard keeps the module's class and attributes, so this works on FSDP2 models too.
    """
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None)


def val_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str,
             autocast: Optional[Callable[[], ContextManager]] = None) -> float:
    """Mean loss over this rank's micro-batches, averaged over all ranks.

    `batches` yields (x, y) int64 tensors of shape (B, T); every rank must pass the same
    number of batches (each batch is one forward, a collective under FSDP2). The result is
    the mean of the per-batch mean losses over all batches of all ranks, which is the mean
    of the per-rank means since the ranks have equally many batches. Identical on every rank.
    """
    autocast = autocast or contextlib.nullcontext
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, batches]
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                _, loss = model(x, y)
            total[0] += loss.detach().double()
            total[1] += 1
    if total[1].item() == 0:
        raise ValueError("val_loss needs at least one batch per rank")
    all_reduce_sum(total)
    return (total[0] / total[1]).item()
