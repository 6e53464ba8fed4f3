"""Run under torchrun by tests/test_init_from.py: build the sharded model the trainer builds,
start it from --init_from through the trainer's own init_from_hf, and save the logits of
fixed token ids (rank 0) before any step.

    torchrun --nproc_per_node=N tests/hf_logits_worker.py OUT.pt [trainer flags]
"""

from __future__ import annotations

import sys

import torch

from dcp_train import distributed as D
from dcp_train.checkpoint.state import Progress
from dcp_train.cli import parse_config
from dcp_train.model import GPT
from dcp_train.job.metrics import Metrics
from dcp_train.train.loop import init_from_hf


def main(out: str, argv: list[str]) -> None:
    cfg = parse_config(argv)
    info = D.setup("cpu")
    torch.manual_seed(cfg.training.seed)
    model = D.shard_model(GPT(cfg.model), info)
    init_from_hf(cfg, info, model, Progress(), Metrics(cfg.logging.log_dir, info.is_main))
    ids = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size), generator=ids)
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx)
    if info.is_main:
        torch.save({"idx": idx, "logits": logits}, out)
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
