"""Token data: shards on disk, the global sample order, per-rank loaders, corpus preparation.

    shards.py   find_shards, TokenShards (fixed-length samples), DataError
    sampler.py  global_permutation, global_batch, GlobalOrderSampler (the data-order contract)
    loader.py   build_train_loader (StatefulDataLoader), val_batches
    prepare.py  python -m dcp_train.data.prepare: write shards; ensure_default_data
    remote.py   --data_dir as an fsspec URL: shards downloaded to a local cache
"""

from .loader import build_train_loader, val_batches
from .sampler import GlobalOrderSampler, global_batch, global_permutation
from .shards import DataError, TokenShards, find_shards

__all__ = ["DataError", "GlobalOrderSampler", "TokenShards", "build_train_loader",
           "find_shards", "global_batch", "global_permutation", "val_batches"]
