"""The global data order, and each rank's share of it.

The order depends only on the number of samples, the seed and the samples per optimizer step
(docs/design.md, "Data order"); never on the world size or the micro-batch size:

* Epoch e is a seeded shuffle of all sample ids:
  `global_permutation(N, seed, e) = np.random.default_rng([seed, e]).permutation(N)`.
* The stream is the epochs one after another: stream position p (0-based, infinite) is sample
  `global_permutation(N, seed, p // N)[p % N]`. An epoch boundary may fall inside a step.
* Step s (1-based: the update that takes the step count from s-1 to s, docs/design.md, "Step")
  consumes stream positions `[(s-1)*S, s*S)`, with `S = samples_per_step =
  total_batch_size // seq_len`.
* Rank r of W takes the contiguous slice `[(s-1)*S + r*S/W, (s-1)*S + (r+1)*S/W)` of step s,
  in order; a DataLoader with batch_size b cuts it into (S/W)/b micro-batches, the
  gradient-accumulation micro-steps of that rank.

So the union over ranks of what step s reads is always `global_batch(N, seed, S, s)`, and a run
resumed after step s on any world size continues at step s+1 (`start_step=s`) with no sample
seen twice and none skipped.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler


def global_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a seeded shuffle of range(num_samples), one per epoch,
    independent of world size and micro-batch size."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def stream_samples(num_samples: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Sample ids at stream positions [start, stop)."""
    out = []
    pos = start
    while pos < stop:
        epoch, offset = divmod(pos, num_samples)
        take = min(stop - pos, num_samples - offset)
        out.append(global_permutation(num_samples, seed, epoch)[offset:offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def global_batch(num_samples: int, seed: int, samples_per_step: int, step: int) -> np.ndarray:
    """Sample ids read by step `step` (1-based) over all ranks, in stream order."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got {step}")
    S = samples_per_step
    return stream_samples(num_samples, seed, (step - 1) * S, step * S)


class GlobalOrderSampler(Sampler[int]):
    """Infinite sampler of rank `rank`'s share of the global order, from step start_step+1 on.

    Resumable through torchdata's StatefulDataLoader, which calls `state_dict()` /
    `load_state_dict()` of the sampler (inside its BatchSampler's state). The state is the
    absolute number of samples this rank has been handed out since step 1 (`"consumed"`) plus
    the settings it is only valid for, all plain ints. With num_workers > 0 the loader takes the
    sampler state right after drawing each batch's indices and reports the snapshot of the last
    batch *yielded to the training loop*, so prefetched batches are not counted as consumed.

    To continue on a different world size, build a new sampler with `start_step=<steps done>`
    instead of loading the state (loading a state saved under another rank/world size raises).
    """

    def __init__(self, num_samples: int, seed: int, samples_per_step: int, rank: int,
                 world_size: int, start_step: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if samples_per_step < 1 or samples_per_step % world_size:
            raise ValueError(f"samples_per_step {samples_per_step} is not a positive multiple of "
                             f"the world size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples = num_samples
        self.seed = seed
        self.samples_per_step = samples_per_step
        self.rank = rank
        self.world_size = world_size
        self.per_rank = samples_per_step // world_size
        self._begin = start_step * self.per_rank  # where a fresh iterator starts (rank-local)
        self._consumed = self._begin  # samples handed out so far by the live iterator
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def position(self, consumed: int) -> int:
        """Global stream position of this rank's `consumed`-th sample (0-based)."""
        step, k = divmod(consumed, self.per_rank)
        return step * self.samples_per_step + self.rank * self.per_rank + k

    def _sample_at(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.num_samples)
        if epoch != self._epoch:  # one permutation per epoch, cached
            self._epoch, self._perm = epoch, global_permutation(self.num_samples, self.seed, epoch)
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[int]:
        self._consumed = self._begin
        return self._generate(self._begin)

    def _generate(self, consumed: int) -> Iterator[int]:
        while True:
            sample = self._sample_at(self.position(consumed))
            consumed += 1
            self._consumed = consumed  # counted before the yield: state_dict() sees it handed out
            yield sample

    def _settings(self) -> dict[str, int]:
        return {"num_samples": self.num_samples, "seed": self.seed,
                "samples_per_step": self.samples_per_step, "rank": self.rank,
                "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self._consumed, **self._settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict[k] for k in self._settings()}
        if saved != self._settings():
            raise ValueError(f"data loader state was saved with {saved}, but this loader has "
                             f"{self._settings()}; to continue on another world size, rebuild "
                             f"the loader with start_step=<steps done> instead of loading it")
        self._begin = self._consumed = int(state_dict["consumed"])
