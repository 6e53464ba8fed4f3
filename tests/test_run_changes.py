"""Building blocks of "never silently changes what it resumes" (issue 13, points 3 and 4):
the data fingerprint, compare_run (what must match, what may change) and the LR schedule of an
extended run. Pure functions on real files; no training.
Run: .venv/bin/python -m pytest tests/test_run_changes.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from helpers import write_shards

from dcp_train.checkpoint.resume_rules import change_lines, compare_run, end_note, mismatch_message
from dcp_train.cli import parse_config
from dcp_train.config import as_record, redacted_config
from dcp_train.data import find_shards
from dcp_train.data.fingerprint import (SAMPLES, SAMPLE_BYTES, data_fingerprint, fingerprint_diff,
                                        window_offsets)
from dcp_train.optim import lr_at, lr_of, saved_schedule, schedule_for_launch, schedule_of

BASE = ["--preset", "tiny", "--vocab_size", "512", "--block_size", "32", "--seq_len", "32",
        "--generate_interval", "0", "--hellaswag_interval", "0"]


# ------------------------------------------------------------------------- data fingerprint
def test_fingerprint_same_data_anywhere_and_every_kind_of_difference(tmp_path):
    a = find_shards(str(write_shards(tmp_path / "a")), "train")
    fp = data_fingerprint(a)
    assert [e["name"] for e in fp["files"]] == [os.path.basename(f) for f in a]
    assert [e["size"] for e in fp["files"]] == [os.path.getsize(f) for f in a]
    moved = shutil.copytree(tmp_path / "a", tmp_path / "moved")  # same shards elsewhere
    assert data_fingerprint(find_shards(str(moved), "train")) == fp
    assert fingerprint_diff(fp, fp) == []

    other_seed = data_fingerprint(find_shards(str(write_shards(tmp_path / "b", seed=1)), "train"))
    assert other_seed["digest"] != fp["digest"]
    assert fingerprint_diff(fp, other_seed) == [
        "synth_train_000001.npy: same size, other content",
        "synth_train_000002.npy: same size, other content"]

    # one token changed in the middle of a big shard, inside a sampled window
    big = tmp_path / "c" / "x_train_000001.npy"
    big.parent.mkdir()
    np.save(big, np.arange(2_000_000, dtype=np.uint16))
    before = data_fingerprint([str(big)])
    offset = window_offsets(big.stat().st_size)[7] + 10
    with open(big, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff")
    assert fingerprint_diff(before, data_fingerprint([str(big)])) == [
        "x_train_000001.npy: same size, other content"]

    fewer = data_fingerprint(a[:1])
    assert fingerprint_diff(fp, fewer) == ["synth_train_000002.npy: missing now"]
    assert fingerprint_diff(fp, data_fingerprint(a[::-1])) == ["the same shards in another order"]
    np.save(tmp_path / "a" / "synth_train_000002.npy", np.zeros(10, dtype=np.uint16))
    assert fingerprint_diff(fp, data_fingerprint(a)) == [
        f"synth_train_000002.npy: {fp['files'][1]['size']:,} bytes, now 148"]  # 128-byte header


def test_fingerprint_reads_a_fixed_amount_per_shard(tmp_path):
    """At most SAMPLES windows of SAMPLE_BYTES per file, whatever its size: 40 sparse shards
    of 256 MB (10 GB) take well under a second (sparse files: this bounds the number of reads,
    not a cold disk's time)."""
    assert len(window_offsets(10**9)) == SAMPLES
    assert window_offsets(10**9)[-1] == 10**9 - SAMPLE_BYTES and window_offsets(10) == [0]
    files = []
    for i in range(40):
        path = tmp_path / f"s_train_{i:06d}.npy"
        with open(path, "wb") as f:
            f.truncate(256 * 2**20)
        files.append(str(path))
    t0 = time.perf_counter()
    fp = data_fingerprint(files)
    assert time.perf_counter() - t0 < 2.0
    assert sum(e["size"] for e in fp["files"]) == 40 * 256 * 2**20


# ------------------------------------------------------------------------------ compare_run
def _saved(args: list[str]) -> dict:
    """The config a checkpoint of a run with these flags stores (JSON round trip)."""
    return json.loads(json.dumps(redacted_config(parse_config([*BASE, *args]))))


def test_compare_run_errors_for_the_data_stream_and_model(tmp_path):
    fp = data_fingerprint(find_shards(str(write_shards(tmp_path / "a")), "train"))
    other = data_fingerprint(find_shards(str(write_shards(tmp_path / "b", seed=3)), "train"))
    saved = _saved(["--seed", "1", "--total_batch_size", "512"])
    same = parse_config([*BASE, "--seed", "1", "--total_batch_size", "512"])
    assert compare_run(saved, fp, same, fp) == ([], {})

    changed = parse_config([*BASE, "--seed", "2", "--total_batch_size", "1024",
                            "--seq_len", "16", "--n_embd", "128", "--n_layer", "3"])
    errors, changes = compare_run(saved, fp, changed, other)
    assert errors == ["--seed 2 (the saved run used 1)",
                      "--seq_len 16 (the saved run used 32)",
                      "--total_batch_size 1024 (the saved run used 512)",
                      "--n_layer 3 (the saved run used 2)",
                      "--n_embd 128 (the saved run used 64)",
                      "other training data in --data_dir data/default "
                      "(synth_train_000001.npy: same size, other content; "
                      "synth_train_000002.npy: same size, other content)"]
    assert changes == {}
    line = mismatch_message("/ckpt/step_00000004", errors[:1])
    assert line == ("cannot resume /ckpt/step_00000004 with these flags: --seed 2 (the saved run "
                    "used 1); the data order or the model would differ from the saved run's. "
                    "Pass the saved values to continue it, or start a new run in another "
                    "--checkpoint_dir")


def test_compare_run_reports_what_may_change(tmp_path):
    fp = data_fingerprint(find_shards(str(write_shards(tmp_path / "a")), "train"))
    saved = _saved(["--storage_options", '{"key": "AKIA1", "secret": "s3cr3t-one"}'])
    cfg = parse_config([*BASE, "--max_lr", "1e-3", "--weight_decay", "0.05", "--warmup_steps",
                        "5", "--max_steps", "40", "--dropout", "0.1", "--eval_interval", "7",
                        "--batch_size", "4", "--num_workers", "1", "--data_dir", "/moved",
                        "--auto_resume", "--storage_options",
                        '{"secret": "rotated-two", "key": "AKIA2"}'])
    errors, changes = compare_run(saved, fp, cfg, fp)
    assert errors == []
    assert changes == {"max_steps": [19073, 40], "warmup_steps": [10, 5],
                       "max_lr": [0.003, 0.001], "weight_decay": [0.1, 0.05],
                       "batch_size": [8, 4], "data_dir": ["data/default", "/moved"],
                       "num_workers": [0, 1], "eval_interval": [25, 7], "dropout": [0.0, 0.1]}
    assert change_lines({"max_lr": [0.003, 0.001]}) == [
        "WARNING: --max_lr changed on resume: 0.003 -> 0.001"]
    # a checkpoint from before fingerprints: not an error, a warning
    errors, changes = compare_run(_saved([]), None, parse_config(BASE), fp)
    assert errors == [] and changes == {"data_fingerprint": [None, fp["digest"]]}
    assert "could not be checked" in change_lines(changes)[0]
    # a setting the checkpoint does not know (newer code) is no change
    older = {k: v for k, v in _saved([]).items() if k != "lr_schedule"}
    assert compare_run(older, fp, parse_config(BASE), fp) == ([], {})


def test_end_note():
    assert end_note(19, 20) is None
    assert end_note(20, 20) == ("checkpoint is at step 20 and --max_steps is 20: nothing to "
                                "train; pass a larger --max_steps to extend the run (see "
                                "--lr_schedule)")
    assert end_note(25, 20).startswith("checkpoint is at step 25 and --max_steps is 20")


# ----------------------------------------------------------------------------- LR schedule
def test_lr_schedule_continue_keeps_the_saved_cosine_and_never_jumps():
    original = schedule_of(3e-3, 3, 20)
    assert schedule_for_launch(None, 3e-3, 3, 20) == original  # fresh start: the flags
    extended = schedule_for_launch(original, 3e-3, 3, 30, "continue")
    assert extended == original  # what the extended run stores: resumed again, the same
    assert [lr_of(s, extended) for s in range(1, 21)] == [lr_at(s, 3e-3, 3, 20)
                                                          for s in range(1, 21)]
    assert [lr_of(s, extended) for s in range(21, 31)] == [3e-3 * 0.1] * 10
    lrs = [lr_of(s, extended) for s in range(4, 31)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # after warmup: never up
    # a chain of resumes keeps the run's first schedule
    assert schedule_for_launch(extended, 3e-3, 3, 50, "continue") == original
    # the explicitly changed peak LR is taken from the flags (a reported change)
    assert schedule_for_launch(original, 1e-3, 3, 30, "continue") == schedule_of(1e-3, 3, 20)


def test_lr_schedule_recompute_refits_the_cosine():
    original = schedule_of(3e-3, 3, 20)
    recomputed = schedule_for_launch(original, 3e-3, 3, 30, "recompute")
    assert recomputed == schedule_of(3e-3, 3, 30)
    assert lr_of(21, recomputed) > lr_of(20, original)  # the documented jump
    with pytest.raises(ValueError):
        schedule_for_launch(original, 3e-3, 3, 30, "stretch")


def test_saved_schedule_of_older_checkpoints():
    config = as_record(parse_config([*BASE, "--max_steps", "40"]))
    assert saved_schedule({"config": config}) == schedule_of(3e-3, 10, 40)
    assert saved_schedule({"config": config, "lr_schedule": schedule_of(1.0, 2, 3)}) == \
        schedule_of(1.0, 2, 3)
