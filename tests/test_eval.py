"""Evaluations: HellaSwag scoring, sampling, val loss; single process and FSDP2 on 2 ranks.

Needs the GPT-2 tokenizer from tiktoken's cache (TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dcp_train.config import ModelConfig
from dcp_train.data.tokenizer import get_tokenizer
from dcp_train.model import GPT
from dcp_train.train.evaluate import val_loss
from dcp_train.train.generate import decode, generate
from dcp_train.train.hellaswag import (HellaSwagError, download, hellaswag_accuracy,
                                       iterate_examples, most_likely_row, render_example)

TINY = ModelConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
PROMPT = "Hello, I'm a language model,"

EXAMPLES = [
    {"ind": 0, "activity_label": "Cooking", "ctx_a": "A man cracks eggs.", "ctx_b": "he",
     "ctx": "A man cracks eggs into a bowl. He", "label": 2, "split": "val",
     "split_type": "indomain", "source_id": "x",
     "endings": ["jumps over the moon.", "paints the car red.",
                 "whisks them with a fork.", "reads the newspaper loudly."]},
    {"ind": 1, "ctx": "The dog runs to the door and", "label": 0,
     "endings": ["barks at the mailman.", "sings.", "opens a bank account.", "flies."]},
    # long enough (> block_size 64 tokens) to exercise left truncation
    {"ind": 2, "ctx": " ".join(["She keeps stacking blocks on the table, one after another,"] * 8),
     "label": 3, "endings": ["the sky turns green.", "nothing.", "a fish swims by.",
                             "until the tower finally falls over."]},
]


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def write_jsonl(path, examples) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    return str(path)


def rng_snapshot():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_rng_unchanged(before):
    torch_state, np_state, py_state = before
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


# ---------------------------------------------------------------- HellaSwag, by hand

def _logit_for_loss(loss: float, vocab: int) -> float:
    """Target logit a (others 0) such that cross-entropy = -a + log(e^a + vocab - 1) = loss."""
    return -math.log((math.exp(loss) - 1.0) / (vocab - 1))


def test_most_likely_row_uses_mean_over_ending_tokens():
    # 4 candidates, 2 context tokens then the ending; V=8. Per-token ending losses:
    #   row 0: [1.0]            sum 1.0  mean 1.0   <- lowest sum
    #   row 1: [2.0]            sum 2.0  mean 2.0
    #   row 2: [0.5, 0.5, 0.5]  sum 1.5  mean 0.5   <- lowest mean: the answer
    #   row 3: [1.5, 1.5]       sum 3.0  mean 1.5
    V, T = 8, 5
    tokens = torch.tensor([[1, 2, 3, 0, 0],
                           [1, 2, 4, 0, 0],
                           [1, 2, 5, 6, 7],
                           [1, 2, 6, 5, 0]])
    mask = torch.tensor([[0, 0, 1, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 1],
                         [0, 0, 1, 1, 0]])
    ending_losses = {0: [1.0], 1: [2.0], 2: [0.5, 0.5, 0.5], 3: [1.5, 1.5]}
    # Context and padding positions get terrible predictions: they must not count.
    logits = torch.zeros(4, T, V)
    logits[:, :, 0] = 30.0
    for row, losses in ending_losses.items():
        for j, loss in enumerate(losses):
            t = 2 + j  # target position; predicted by logits at t - 1
            logits[row, t - 1] = 0.0
            logits[row, t - 1, tokens[row, t]] = _logit_for_loss(loss, V)

    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
    ending_sum = (per_token * mask[:, 1:]).sum(1)
    assert torch.allclose(ending_sum, torch.tensor([1.0, 2.0, 1.5, 3.0]), atol=1e-5)
    assert ending_sum.argmin().item() == 0  # the sum would pick row 0 ...
    assert most_likely_row(tokens, mask, logits) == 2  # ... the mean picks row 2


def test_render_example_masks_ending_tokens(enc):
    example = {"ctx": "The cat", "label": 1, "endings": ["sat.", "ran far away.", "x", "is"]}
    tokens, mask, label = render_example(example, enc)
    ctx = enc.encode("The cat")
    ends = [enc.encode(" " + e) for e in example["endings"]]
    width = len(ctx) + max(len(e) for e in ends)
    assert label == 1 and tokens.shape == mask.shape == (4, width)
    assert tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end
        assert tokens[i, n:].tolist() == [0] * (width - n)
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (width - n)

    # Left truncation keeps the ending and the most recent context tokens.
    tokens, mask, _ = render_example(example, enc, max_len=len(ends[1]) + 1)
    assert tokens[1].tolist() == ctx[-1:] + ends[1]
    assert mask[1].tolist() == [0] + [1] * len(ends[1])


def test_iterate_examples_missing_file(tmp_path):
    with pytest.raises(HellaSwagError, match="--download"):
        next(iterate_examples(str(tmp_path / "hellaswag_val.jsonl")))


def test_iterate_examples_rejects_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "a", "label": 0, "endings": ["b"]}\n')
    with pytest.raises(HellaSwagError, match="bad.jsonl:1"):
        list(iterate_examples(str(path)))


def test_download_from_url_and_offline_error(tmp_path):
    # A file:// URL exercises the real download code without internet.
    source = write_jsonl(tmp_path / "source.jsonl", EXAMPLES)
    path = download(str(tmp_path / "dl"), url="file://" + source)
    assert [e["ctx"] for e in iterate_examples(path)] == [e["ctx"] for e in EXAMPLES]
    with pytest.raises(HellaSwagError, match="could not download"):
        download(str(tmp_path / "dl2"), url="file://" + str(tmp_path / "nowhere.jsonl"))
    assert not os.path.exists(tmp_path / "dl2" / "hellaswag_val.jsonl")


def test_hellaswag_accuracy_single_process(tmp_path, enc):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    model = tiny_model()
    model.train()
    before = rng_snapshot()
    correct, total, acc = hellaswag_accuracy(model, path, enc, "cpu", rank=0, world_size=1)
    assert_rng_unchanged(before)
    assert model.training
    assert total == len(EXAMPLES) and 0 <= correct <= total and acc == correct / total

    # Same answer as scoring each example by hand.
    expected = 0
    with torch.no_grad():
        model.eval()
        for example in EXAMPLES:
            tokens, mask, label = render_example(example, enc, max_len=TINY.block_size)
            logits, _ = model(tokens)
            expected += int(most_likely_row(tokens, mask, logits) == label)
    assert correct == expected

    assert hellaswag_accuracy(model, path, enc, "cpu", limit=2)[1] == 2


# ---------------------------------------------------------------- generate, val_loss

def test_generate_is_seeded_per_rank_and_leaves_global_rng(enc):
    model = tiny_model()
    before = rng_snapshot()
    a = generate(model, enc, PROMPT, num_sequences=4, max_new_tokens=8, seed=42, rank=0)
    assert_rng_unchanged(before)
    b = generate(model, enc, PROMPT, num_sequences=4, max_new_tokens=8, seed=42, rank=0)
    c = generate(model, enc, PROMPT, num_sequences=4, max_new_tokens=8, seed=42, rank=1)
    assert len(a) == 4 and all(s.startswith(PROMPT) and len(s) > len(PROMPT) for s in a)
    assert a == b
    assert a != c
    assert model.training


def test_generate_crops_context_to_block_size(enc):
    model = tiny_model()
    out = generate(model, enc, PROMPT, num_sequences=2, max_new_tokens=TINY.block_size + 5)
    assert len(out) == 2 and all(s.startswith(PROMPT) for s in out)


def test_decode_drops_padded_vocab_ids(enc):
    hello = enc.encode("hello")
    assert decode(enc, hello + [50257, 50303]) == "hello"


def test_val_loss_is_mean_of_batch_losses():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 50257, (2, 16), generator=g),
                torch.randint(0, 50257, (2, 16), generator=g)) for _ in range(3)]
    with torch.no_grad():
        expected = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    before = rng_snapshot()
    got = val_loss(model, iter(batches), "cpu")
    assert_rng_unchanged(before)
    assert got == pytest.approx(expected, rel=1e-6)
    assert model.training


# ---------------------------------------------------------------- FSDP2, 2 ranks on gloo

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, port: int, hellaswag_path: str, batches: list, out_dir: str):
    """One rank: FSDP2-wrap the tiny model and run every evaluation; write results as JSON."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model = tiny_model()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        enc = get_tokenizer()

        before = rng_snapshot()
        hs = hellaswag_accuracy(model, hellaswag_path, enc, "cpu", rank, WORLD_SIZE)
        loss = val_loss(model, batches[rank::WORLD_SIZE], "cpu")
        samples = generate(model, enc, PROMPT, num_sequences=2, max_new_tokens=6, rank=rank)
        assert_rng_unchanged(before)
        result = {"hellaswag": list(hs), "val_loss": loss, "samples": samples,
                  "training": model.training}
        dist.destroy_process_group()
    except Exception:
        result = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _spawn_with_timeout(fn, args, timeout_s: float) -> None:
    context = mp.start_processes(fn, args=args, nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"FSDP evaluation did not finish in {timeout_s} s (deadlock?)")


def test_fsdp_two_ranks_odd_examples_match_single_process(tmp_path, enc):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)  # 3 examples: rank 1 pads
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50257, (2, 16), generator=g),
                torch.randint(0, 50257, (2, 16), generator=g)) for _ in range(4)]

    _spawn_with_timeout(_fsdp_worker, (_free_port(), path, batches, str(tmp_path)), 60.0)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for r in results:
        assert "error" not in r, r.get("error")

    model = tiny_model()
    single_hs = list(hellaswag_accuracy(model, path, enc, "cpu"))
    single_loss = val_loss(model, batches, "cpu")
    for r in results:
        assert r["hellaswag"] == single_hs
        assert r["val_loss"] == pytest.approx(single_loss, rel=1e-5)
        assert r["training"] is True
        assert len(r["samples"]) == 2 and all(s.startswith(PROMPT) for s in r["samples"])
    assert results[0]["samples"] != results[1]["samples"]
