"""Per-rank random number generator state: seed, capture, restore. One code path for each.

Each rank has its own streams (dropout masks differ between ranks). At a fresh start, and when a
run resumes on a different world size, every rank seeds all its generators from
(seed, step, rank); on the same world size each rank restores exactly the state it saved.

Captured state is tensors plus JSON-able lists (no pickle): torch CPU state (uint8 tensor),
the CUDA state of this rank's current device (uint8 tensor; the one device its work runs on,
so a resume may see the GPUs under other CUDA_VISIBLE_DEVICES or indices), numpy's MT19937
state and Python's `random` state as plain lists. Checkpoints written before kept the state
of every visible device (a stacked 2-D tensor): restoring one takes the current device's row
(the only row if one device was visible).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dcp_train.errors import CheckpointError


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that depends on (seed, step, rank) and nothing else."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> 1)


def seed_all(seed: int, step: int, rank: int) -> None:
    s = derived_seed(seed, step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device


def capture() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensor states, JSON-able states) of this process's generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()  # the current device's only
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    plain = {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next]}
    return tensors, plain


def restore(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state(tensors["cuda"], torch.cuda.current_device()))
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def cuda_state(saved: torch.Tensor, device: int) -> torch.Tensor:
    """The CUDA generator state to restore on `device` (an index) from a checkpoint's: this
    format's 1-D state of the saving rank's device, or an older checkpoint's 2-D stack of
    every device it saw (one row per device index)."""
    if saved.dim() == 1:
        return saved
    if len(saved) == 1:
        return saved[0]
    if device < len(saved):
        return saved[device]
    raise CheckpointError(f"the checkpoint holds the CUDA RNG states of {len(saved)} devices "
                          f"(an older format), none for this rank's device {device}; resume "
                          "with the CUDA_VISIBLE_DEVICES it was saved with")
