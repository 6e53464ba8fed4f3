"""Token shards, the global data order, resumable loaders and shard preparation.

Run: TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcp_train.data import (DataError, GlobalOrderSampler, TokenShards, build_train_loader,
                            find_shards, global_batch, global_permutation, val_batches)
from dcp_train.data.prepare import ensure_default_data, prepare
from dcp_train.data.tokenizer import EOT, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8
SHARD_LENGTHS = (97, 160, 130)  # -> 12 + 19 + 16 = 47 samples of SEQ tokens
N = sum((n - 1) // SEQ for n in SHARD_LENGTHS)
S = 12  # samples per step: divisible by world sizes 1, 2, 3 and micro-batches 1, 2
SEED = 1234


def digest(ids) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()


@pytest.fixture
def shards(tmp_path):
    """Train shards whose token at offset t of shard k is 1000*k + t (so x identifies a sample)."""
    files = []
    for k, n in enumerate(SHARD_LENGTHS):
        path = tmp_path / f"synth_train_{k + 1:06d}.npy"
        np.save(path, (1000 * k + np.arange(n)).astype(np.uint16))
        files.append(str(path))
    np.save(tmp_path / "synth_val_000000.npy", np.arange(50, dtype=np.uint16))
    return files


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---- data-order contract -------------------------------------------------------------------

def run_steps(files, world_size, micro_batch, steps, start_step=0, num_workers=0):
    """Sample ids of each step over all ranks (each rank reads its micro-steps of the step)."""
    iters = [iter(build_train_loader(files, SEQ, micro_batch, S, r, world_size, SEED,
                                     num_workers, start_step)) for r in range(world_size)]
    micro_steps = S // world_size // micro_batch
    per_step = []
    for _ in range(steps):
        ids = [b[0] for it in iters for b in take(it, micro_steps)]
        per_step.append(torch.cat(ids).tolist())
    return per_step


def test_global_order_is_independent_of_world_size_and_micro_batch(shards):
    steps = 9  # 9 * 12 = 108 positions > 2 epochs of N = 47 samples
    assert steps * S > 2 * N
    expected = [digest(global_batch(N, SEED, S, s)) for s in range(1, steps + 1)]
    for world_size in (1, 2, 3):
        for micro_batch in (1, 2):
            per_step = run_steps(shards, world_size, micro_batch, steps)
            assert [digest(ids) for ids in per_step] == expected, (world_size, micro_batch)
            # ranks in order, micro-batches in order: exactly the stream order
            assert per_step[4] == global_batch(N, SEED, S, 5).tolist()


def test_stream_is_one_permutation_per_epoch():
    stream = np.concatenate([global_batch(N, SEED, S, s) for s in range(1, 9)])
    for epoch in range(2):
        block = stream[epoch * N:(epoch + 1) * N]
        assert sorted(block.tolist()) == list(range(N))
        assert np.array_equal(block, global_permutation(N, SEED, epoch))
    assert not np.array_equal(global_permutation(N, SEED, 0), global_permutation(N, SEED, 1))
    assert not np.array_equal(global_permutation(N, SEED, 0), global_permutation(N, SEED + 1, 0))


def test_sampler_rank_slices_and_errors():
    sampler = GlobalOrderSampler(N, SEED, S, rank=1, world_size=3, start_step=2)
    it = iter(sampler)
    step3 = global_batch(N, SEED, S, 3)
    assert [next(it) for _ in range(4)] == step3[4:8].tolist()
    with pytest.raises(ValueError, match="multiple"):
        GlobalOrderSampler(N, SEED, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="multiple"):
        build_train_loader(["unused"], SEQ, 4, S, 0, 2, SEED, 0)  # 6 per rank, micro-batch 4


# ---- resume --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_continues_the_stream(shards, num_workers):
    args = (shards, SEQ, 2, S, 1, 2, SEED, num_workers)  # rank 1 of 2, micro-batch 2
    reference = take(iter(build_train_loader(*args)), 10)

    loader = build_train_loader(*args)
    it = iter(loader)
    first = take(it, 4)
    state = loader.state_dict()
    del it, loader
    state = json.loads(json.dumps(state))  # plain data: survives JSON, no pickle needed

    resumed = build_train_loader(*args)
    resumed.load_state_dict(state)
    rest = take(iter(resumed), 6)
    for want, got in zip(reference, first + rest):
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def test_state_dict_before_iterating_and_mismatched_world_size(shards):
    loader = build_train_loader(shards, SEQ, 2, S, 0, 2, SEED, 0, start_step=3)
    state = loader.state_dict()
    resumed = build_train_loader(shards, SEQ, 2, S, 0, 2, SEED, 0)
    resumed.load_state_dict(state)
    ids = torch.cat([b[0] for b in take(iter(resumed), 3)]).tolist()
    assert ids == global_batch(N, SEED, S, 4)[:6].tolist()

    other = build_train_loader(shards, SEQ, 2, S, 0, 3, SEED, 0)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="start_step"):
        next(iter(other))


def test_rebuild_at_start_step_on_another_world_size(shards):
    before = run_steps(shards, world_size=2, micro_batch=2, steps=3)
    after = run_steps(shards, world_size=3, micro_batch=1, steps=3, start_step=3,
                      num_workers=2)
    got = [digest(ids) for ids in before + after]
    assert got == [digest(global_batch(N, SEED, S, s)) for s in range(1, 7)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_global_rng_alone(shards, num_workers):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    loader = build_train_loader(shards, SEQ, 2, S, 0, 1, SEED, num_workers)
    it = iter(loader)
    take(it, 7)
    loader.state_dict()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


# ---- shards --------------------------------------------------------------------------------

def test_token_shards_samples(shards):
    ds = TokenShards(shards, SEQ)
    assert len(ds) == N
    i, x, y = ds[0]
    assert i == 0 and x.dtype == y.dtype == torch.int64
    assert x.tolist() == list(range(SEQ)) and y.tolist() == list(range(1, SEQ + 1))
    i, x, y = ds[13]  # shard 1 (12 samples in shard 0), its sample 1
    assert x.tolist() == [1000 + SEQ + t for t in range(SEQ)]
    assert torch.equal(x[1:], y[:-1])
    _, x, y = ds[N - 1]  # last sample of shard 2: 16 samples, tokens [120, 129)
    assert x[0].item() == 2000 + 15 * SEQ and y[-1].item() == 2000 + 16 * SEQ
    with pytest.raises(IndexError):
        ds[N]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].dtype == torch.int64 and batch[1].shape == (4, SEQ)


def test_loader_batches_match_the_dataset(shards):
    ds = TokenShards(shards, SEQ)
    ids, x, y = next(iter(build_train_loader(shards, SEQ, 3, S, 0, 2, SEED, 0)))
    assert ids.tolist() == global_batch(N, SEED, S, 1)[:3].tolist()
    for row, i in enumerate(ids.tolist()):
        assert torch.equal(x[row], ds[i][1]) and torch.equal(y[row], ds[i][2])


def test_val_batches_are_rank_sharded(shards):
    ds = TokenShards(shards, SEQ)
    W, b, steps = 2, 3, 10
    for r in range(W):
        batches = list(val_batches(shards, SEQ, b, r, W, steps))
        assert len(batches) == steps
        for k, (x, y) in enumerate(batches):
            assert x.shape == y.shape == (b, SEQ)
            for j in range(b):
                assert torch.equal(x[j], ds[((k * W + r) * b + j) % N][1])


def test_find_shards(tmp_path, shards):
    assert find_shards(str(tmp_path), "train") == shards
    assert find_shards(str(tmp_path), "val") == [str(tmp_path / "synth_val_000000.npy")]
    with pytest.raises(DataError, match="does not exist"):
        find_shards(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no val shard"):
        find_shards(str(tmp_path / "empty"), "val")


@pytest.mark.parametrize("array, message", [
    (np.arange(100, dtype=np.int32), "has dtype int32, expected uint16"),
    (np.zeros(0, dtype=np.uint16), "is empty"),
    (np.arange(SEQ, dtype=np.uint16), "fewer than seq_len"),
    (np.zeros((4, 50), dtype=np.uint16), "expected a 1-D array"),
])
def test_bad_shards(tmp_path, shards, array, message):
    bad = tmp_path / "bad_train_000009.npy"
    np.save(bad, array)
    with pytest.raises(DataError, match=message) as err:
        TokenShards(shards + [str(bad)], SEQ)
    assert str(bad) in str(err.value)
    (tmp_path / "junk_train_000010.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="junk_train_000010.npy"):
        TokenShards([str(tmp_path / "junk_train_000010.npy")], SEQ)


# ---- prepare -------------------------------------------------------------------------------

def read_split(out, split):
    arrays = [np.load(p) for p in find_shards(str(out), split)]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    return arrays


def test_prepare_text(tmp_path):
    docs = ["Hello world, this is the first document.\nIt has two lines.",
            "A second document: numbers 1 2 3, unicode é ü, and more words."]
    for i, text in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    paths = prepare("text", str(out), shard_size=10, val_tokens=7,
                    inputs=[str(tmp_path / "doc*.txt")], progress=False)
    val, train = read_split(out, "val"), read_split(out, "train")
    assert len(val) == 1 and val[0].size == 7 and len(train) >= 2
    assert all(a.size == 10 for a in train[:-1])
    tokens = np.concatenate(val + train)
    assert tokens[0] == EOT and (tokens == EOT).sum() == 2
    text = get_tokenizer().decode(tokens.tolist())
    assert text == "".join("<|endoftext|>" + d for d in docs)
    assert paths[0].endswith("text_val_000000.npy")
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left


def test_prepare_fineweb_local_jsonl_cli(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"text": f"Document number {i} talks about {'science ' * (i % 5 + 1)}.", "id": i}
            for i in range(40)]
    src = tmp_path / "fineweb_sample.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fw"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "dcp_train.data.prepare", "--source",
                           "fineweb", "--dataset_path", str(src), "--out", str(out),
                           "--shard_size", "200"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    val, train = read_split(out, "val"), read_split(out, "train")
    assert val[0].size == 200 and val[0][0] == EOT and len(train) >= 1
    tokens = np.concatenate(val + train)
    assert (tokens == EOT).sum() == len(rows)
    assert get_tokenizer().decode(tokens.tolist()).split("<|endoftext|>")[1:] == \
        [r["text"] for r in rows]


def test_prepare_default_corpus(tmp_path):
    out = tmp_path / "default"
    prepare("default", str(out), max_tokens=20_000, shard_size=4096, progress=False)
    val, train = read_split(out, "val"), read_split(out, "train")
    assert val[0].size == 1000 and sum(a.size for a in train) == 19_000
    assert val[0][0] == EOT and (val[0] < 50257).all()
    assert "import" in get_tokenizer().decode(val[0].tolist())


def test_ensure_default_data(tmp_path, shards):
    ensure_default_data(str(tmp_path))  # holds shards already: untouched
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(f) for f in shards] + ["synth_val_000000.npy"])
    target = tmp_path / "nested" / "data"
    ensure_default_data(str(target))
    val, train = read_split(target, "val"), read_split(target, "train")
    assert val[0][0] == EOT and sum(a.size for a in val + train) == 3_000_000
    assert not [n for n in os.listdir(target.parent) if ".tmp-" in n]
    assert len(TokenShards(find_shards(str(target), "train"), 64)) > 40_000


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        prepare("text", str(tmp_path / "o"), inputs=[str(tmp_path / "nothing*.txt")],
                progress=False)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="all in the val shard"):
        prepare("text", str(tmp_path / "o"), val_tokens=100, inputs=[str(tmp_path / "tiny.txt")],
                progress=False)
