"""Token shards on disk and the fixed-length samples cut from them.

A shard is a 1-D uint16 `.npy` array of GPT-2 tokens, as build-nanogpt's `fineweb.py` writes
them (and `python -m dcp_train.data.prepare` does): every document is preceded by the EOT token
50256, and the file name says the split: `edufineweb_val_000000.npy`,
`edufineweb_train_000001.npy`, ...

Samples. Shard k of length `len_k` holds `(len_k - 1) // seq_len` samples; sample j of that shard
is the `seq_len + 1` tokens starting at `j * seq_len` (input = all but the last, target = all but
the first). Samples never cross a shard boundary, so the tail of each shard (fewer than
`seq_len + 1` tokens) is never used. Global sample ids number the samples of all shards in file
order: shard 0's samples first, then shard 1's, and so on.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

SHARD_DTYPE = np.uint16


class DataError(ValueError):
    """Bad or missing token data; the message says which file and what to do."""


def find_shards(data_dir: str, split: str) -> list[str]:
    """Sorted paths of the `.npy` shards in local `data_dir` whose name contains `_<split>_`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir!r} does not exist; write token shards there with "
                        f"python -m dcp_train.data.prepare --out {data_dir}")
    names = sorted(n for n in os.listdir(data_dir)
                   if n.endswith(".npy") and f"_{split}_" in n and not n.startswith("."))
    if not names:
        raise DataError(f"data dir {data_dir!r} holds no {split} shard (*_{split}_*.npy); write "
                        f"shards with python -m dcp_train.data.prepare --out {data_dir}")
    return [os.path.join(data_dir, n) for n in names]


def open_shard(path: str, min_tokens: int = 1) -> np.ndarray:
    """Memory-map one shard read-only and check it is a 1-D uint16 array of >= min_tokens."""
    hint = "(write shards with dcp_train.data.prepare)"
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"shard {path} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable .npy array ({e}) {hint}") from None
    if tokens.dtype != SHARD_DTYPE:
        raise DataError(f"shard {path} has dtype {tokens.dtype}, expected uint16 {hint}")
    if tokens.ndim != 1:
        raise DataError(f"shard {path} has shape {tokens.shape}, expected a 1-D array {hint}")
    if tokens.size == 0:
        raise DataError(f"shard {path} is empty {hint}")
    if tokens.size < min_tokens:
        raise DataError(f"shard {path} has {tokens.size} tokens, fewer than seq_len+1 = "
                        f"{min_tokens}; use a shorter --seq_len or bigger shards {hint}")
    return tokens


class TokenShards(Dataset):
    """Map-style dataset of fixed-length samples over a list of shards (see module docstring).

    `dataset[i]` is `(i, x, y)`: the global sample id as a Python int, and int64 tensors of
    length seq_len with `y[t] == x[t + 1]`. Shards are memory-mapped lazily, once per process
    (the dataset pickles without open maps, so it works in DataLoader worker processes).
    """

    def __init__(self, files: list[str], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not files:
            raise DataError("no shard files given")
        self.files = list(files)
        self.seq_len = seq_len
        counts = [(open_shard(f, seq_len + 1).size - 1) // seq_len for f in self.files]
        # starts[k] = global id of shard k's first sample; starts[-1] = number of samples
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, first token offset) of global sample i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, (i - int(self.starts[k])) * self.seq_len

    def _shard(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: map the files itself
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            self._maps[k] = open_shard(self.files[k], self.seq_len + 1)
        return self._maps[k]

    def __getitem__(self, i):
        i = int(i)
        k, start = self.locate(i)
        tokens = torch.from_numpy(self._shard(k)[start:start + self.seq_len + 1].astype(np.int64))
        return i, tokens[:-1], tokens[1:]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
