"""HellaSwag accuracy (acc_norm, completion style), as in build-nanogpt's hellaswag.py.

Each example is a context and 4 candidate endings. Every candidate is rendered as
context tokens + " ending" tokens; the model scores it by the mean cross-entropy of the ending
tokens only, and the candidate with the lowest mean loss is its answer.

Choices, written down:
- sequences longer than the model's block_size are truncated from the LEFT, so the ending is
  kept and only the oldest context tokens are dropped;
- the padded vocabulary rows (ids >= 50257, which no target ever is) stay in the softmax, as in
  build-nanogpt: a trained model gives them ~zero probability, so they change nothing.

Under torch.distributed, example i belongs to rank i % world_size; every rank runs exactly
ceil(n / world_size) forwards (a rank without an example in the last round does a dummy
forward on a (4, 1) zero tensor and discards it), and the counts are SUM-reduced.

The data is the standard HellaSwag validation jsonl. Get it with

    python -m dcp_train.hellaswag --download data/hellaswag

or copy `hellaswag_val.jsonl` into that folder by hand on a machine without internet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import urllib.error
import urllib.request
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.utils import CallbackIOWrapper

from dcp_train.store.atomic import write_atomic
from dcp_train.compiled import eager
from dcp_train.distributed import agree
from dcp_train.job.progress import bar
from dcp_train.train.evaluate import all_reduce_sum, block_size_of, distributed_ready, eval_mode

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_FILENAME = "hellaswag_val.jsonl"


class HellaSwagError(RuntimeError):
    """The HellaSwag file is missing, malformed, or could not be downloaded."""


def iterate_examples(path: str) -> Iterator[dict]:
    """Yield the examples (dicts with "ctx", "label", "endings") of a HellaSwag jsonl file."""
    if not os.path.isfile(path):
        raise HellaSwagError(
            f"HellaSwag file {path!r} does not exist. Download it with "
            f"`python -m dcp_train.hellaswag --download {os.path.dirname(path) or '.'}` "
            f"(needs internet), or copy {VAL_FILENAME} from {HELLASWAG_VAL_URL} there")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ok = (isinstance(example["ctx"], str) and isinstance(example["label"], int)
                      and len(example["endings"]) == 4)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise HellaSwagError(f"{path}:{lineno}: not a HellaSwag example (needs \"ctx\", "
                                     f"an int \"label\" and 4 \"endings\")")
            yield example


def render_example(example: dict, enc, max_len: Optional[int] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Example -> (tokens (4, T) long, mask (4, T) long, label).

    Row i is context tokens + tokens of " " + ending i; mask is 1 on the ending tokens. Rows are
    right-padded with zeros (mask 0) to the longest. With `max_len`, each row is first cut to
    its last `max_len` tokens (left truncation: the ending is kept).
    """
    ctx_tokens = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode(" " + ending)
        row = ctx_tokens + end_tokens
        mask = [0] * len(ctx_tokens) + [1] * len(end_tokens)
        if max_len is not None:
            row, mask = row[-max_len:], mask[-max_len:]
        rows.append(row)
        masks.append(mask)
    width = max(len(row) for row in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    return tokens, mask, int(example["label"])


def most_likely_row(tokens: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> int:
    """Index of the candidate whose ending tokens have the lowest MEAN cross-entropy.

    logits[:, t] predicts tokens[:, t + 1], so both are shifted by one and the mask is aligned
    with the targets. The mean (not the sum) is build-nanogpt's acc_norm: long endings are not
    penalised for their length.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_tokens = tokens[:, 1:].to(logits.device)
    shift_mask = mask[:, 1:].to(logits.device).float()
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                             shift_tokens.reshape(-1), reduction="none").view(tokens.size(0), -1)
    mean_loss = (losses * shift_mask).sum(dim=1) / shift_mask.sum(dim=1).clamp(min=1.0)
    return int(mean_loss.argmin().item())


def _load_examples(path: str, limit: int) -> list[dict]:
    """This rank's copy of the examples; every rank raises if any rank failed or disagrees
    (a rank that raised alone would leave the others waiting in a forward)."""
    examples = []

    def read() -> int:
        items = list(iterate_examples(path))
        examples.extend(items[:limit] if limit >= 0 else items)
        return len(examples)

    try:
        counts = agree(read, every_rank=True)
    except HellaSwagError as e:
        raise HellaSwagError(f"{e} (is {path!r} there on every node?)") from None
    if len(set(counts)) > 1:
        raise HellaSwagError(f"ranks read different numbers of examples from {path!r}: "
                             f"{counts}")
    return examples


def hellaswag_accuracy(model: nn.Module, path: str, enc, device, rank: int = 0,
                       world_size: int = 1, limit: int = -1) -> tuple[int, int, float]:
    """(num_correct_norm, num_total, acc) over all ranks; identical on every rank.

    `limit` >= 0 scores only the first `limit` examples. With world_size > 1,
    torch.distributed must be initialized (each rank scores its share).
    """
    if world_size > 1 and not distributed_ready():
        raise ValueError("hellaswag_accuracy with world_size > 1 needs torch.distributed")
    examples = _load_examples(path, limit)
    block_size = block_size_of(model)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # [correct, total]
    with eval_mode(model), eager():  # one length per example: no graph per length
        rounds = range(math.ceil(len(examples) / world_size))
        for round_ in bar(rounds, desc=f"HellaSwag ({len(examples)} examples)", rank=rank):
            i = round_ * world_size + rank
            if i >= len(examples):  # keep in step with the other ranks' forwards
                model(torch.zeros((4, 1), dtype=torch.long, device=device))
                continue
            tokens, mask, label = render_example(examples[i], enc, max_len=block_size)
            logits, _ = model(tokens.to(device))
            counts[0] += int(most_likely_row(tokens, mask, logits) == label)
            counts[1] += 1
    all_reduce_sum(counts)
    correct, total = (int(c) for c in counts.tolist())
    return correct, total, (correct / total if total else 0.0)


def download(dest_dir: str, url: str = HELLASWAG_VAL_URL, timeout: float = 60.0) -> str:
    """Fetch the HellaSwag val jsonl into dest_dir (atomically); return the file path."""
    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, VAL_FILENAME)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, bar(
                desc="HellaSwag download", total=int(response.headers["Content-Length"] or 0)
                or None, unit="B", unit_scale=True, unit_divisor=1024) as shown:
            counted = CallbackIOWrapper(shown.update, response, "read")
            write_atomic(path, lambda f: shutil.copyfileobj(counted, f, 1 << 20))
    except (urllib.error.URLError, OSError) as e:
        raise HellaSwagError(
            f"could not download {url} ({e}). Without internet, copy {VAL_FILENAME} from a "
            f"machine that has it to {path}") from None
    return path


def check_download_dir(dest_dir: str) -> None:
    """Before downloading: DIR is a dir (or will be made, in an existing dir) that does not
    hold the file yet; else one HellaSwagError line (the tools' rule, tools/paths.py)."""
    dest = os.path.abspath(dest_dir)
    parent, path = os.path.dirname(dest), os.path.join(dest, VAL_FILENAME)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise HellaSwagError(f"--download {dest_dir} is a file, not a directory; give a "
                             "directory")
    if not os.path.isdir(parent):
        raise HellaSwagError(f"--download {dest_dir}: its directory {parent} does not exist "
                             "(or is a file); create it first or give another path")
    if os.path.exists(path):
        raise HellaSwagError(f"{path} already exists; remove it to download it again")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcp_train.hellaswag",
                                     description="Get the HellaSwag validation set.",
                                     allow_abbrev=False)
    parser.add_argument("--download", metavar="DIR", required=True,
                        help=f"folder to write {VAL_FILENAME} into")
    args = parser.parse_args(argv)
    try:
        check_download_dir(args.download)
        path = download(args.download)
    except HellaSwagError as e:
        print(f"dcp_train.hellaswag: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
