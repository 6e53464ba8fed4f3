"""Per-rank loaders: the resumable train loader and the deterministic val batches.

Train: `build_train_loader` returns a torchdata StatefulDataLoader over TokenShards with a
GlobalOrderSampler. Each rank reads its contiguous share of every step's global batch as
consecutive micro-batches (see sampler.py), so `loader.state_dict()` / `load_state_dict()` resume
a run on the same world size, and `start_step` rebuilds the loader at a global position (a
resume on another world size). Batches are `(ids, x, y)`: int64 tensors of shape (b,) and
(b, seq_len).

What `loader.state_dict()` holds (torchdata 0.11): nested dicts with str keys whose leaves are
ints, bools and None only (sample counts, torchdata's own worker seeds, our sampler's
`{"consumed", "num_samples", "seed", "samples_per_step", "rank", "world_size"}`), so it
survives a JSON round trip and needs no pickle. Its layout differs between num_workers == 0
and > 0, and a state saved with one worker count must be loaded with the same count.

RNG: the loader gets its own `torch.Generator` seeded with `seed`; creating iterators and
reading batches never draws from the global torch RNG (training's dropout stream).

Workers: `num_workers > 0` starts non-persistent worker processes with the "fork" start method
while CUDA is not initialized in this process (fast, and the only case on CPU), otherwise
"forkserver": forking a process that holds a CUDA context is unsafe, and the forkserver's
children start from a clean process. Workers only read memory-mapped shards into CPU tensors.
The start method does not change the data: the dataset is deterministic and uses no RNG.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from .sampler import GlobalOrderSampler
from .shards import TokenShards


def worker_start_method() -> str:
    """'fork' unless this process has initialized CUDA, then 'forkserver' (see module doc)."""
    return "forkserver" if torch.cuda.is_initialized() else "fork"


def build_train_loader(files: list[str], seq_len: int, micro_batch: int, samples_per_step: int,
                       rank: int, world_size: int, seed: int, num_workers: int,
                       start_step: int = 0) -> StatefulDataLoader:
    """Rank `rank`'s train loader, starting with step start_step+1 (infinite)."""
    per_rank, rest = divmod(samples_per_step, world_size)
    if rest or per_rank % micro_batch:
        raise ValueError(f"samples_per_step {samples_per_step} must be a multiple of "
                         f"world_size*micro_batch = {world_size}*{micro_batch}")
    dataset = TokenShards(files, seq_len)
    sampler = GlobalOrderSampler(len(dataset), seed, samples_per_step, rank, world_size,
                                 start_step)
    workers = {}
    if num_workers > 0:
        workers = dict(persistent_workers=False, multiprocessing_context=worker_start_method())
    with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, batch_size=micro_batch, sampler=sampler,
                                  drop_last=False, num_workers=num_workers, pin_memory=False,
                                  generator=torch.Generator().manual_seed(seed), **workers)


def val_batches(files: list[str], seq_len: int, micro_batch: int, rank: int, world_size: int,
                steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` val micro-batches (x, y) of rank `rank`, in file order, no shuffle.

    Micro-batch k of rank r holds samples `((k*W + r)*b + j) % N` for j < b, so the ranks
    together read the first steps*W*b samples (wrapping around when the split is smaller).
    """
    dataset = TokenShards(files, seq_len)
    n = len(dataset)
    for k in range(steps):
        first = (k * world_size + rank) * micro_batch
        items = [dataset[(first + j) % n] for j in range(micro_batch)]
        yield torch.stack([x for _, x, _ in items]), torch.stack([y for _, _, y in items])
