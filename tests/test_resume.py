"""Sharded DCP checkpoints: bit-exact resume (stopped or SIGKILLed), layout, retention,
per-rank entries, bad input, and torch's own DCP tooling reading our checkpoints.

Every comparison is exact: per-step losses with ==, tensors with torch.equal.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (REPO, TINY, assert_same_run, child_env, kill_job, load_checkpoint, metrics,
                     run_train, snapshot, start_train, train_in, wait_for)

N = 10
# dropout > 0 so that the RNG state matters; shuffled global order; 2 micro-steps per rank;
# warmup ends at step 4, so checkpoints 2 and 4 are in the warmup, 6 and 8 after it.
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--warmup_steps", "4", "--max_steps", str(N), "--checkpoint_interval", "2",
        "--eval_interval", "5", "--val_steps", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted 2-rank run of N steps."""
    out = tmp_path_factory.mktemp("ref")
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(out / "log"),
                  "--checkpoint_dir", str(out / "ckpt")])
    return out


_run = functools.partial(train_in, args=ARGS)


@pytest.mark.parametrize("stop_at,workers", [(2, "0"), (6, "2"), (N - 1, "2")],
                         ids=["in-warmup-w0", "after-warmup-w2", "before-last-step-w2"])
def test_stop_and_auto_resume_is_bit_exact(tmp_path, data, reference, stop_at, workers):
    _run(tmp_path, data, "--num_workers", workers, "--stop_at_step", str(stop_at))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{stop_at:08d}"
    _run(tmp_path, data, "--num_workers", workers, "--auto_resume")
    resumes = metrics(tmp_path / "log", "resume")
    assert [r["step"] for r in resumes] == [stop_at]
    assert resumes[0]["world_size_saved"] == resumes[0]["world_size"] == 2
    assert_same_run(tmp_path, reference, tmp_path, N)


def test_resume_twice_with_retention(tmp_path, data, reference):
    keep = ["--keep_last_n_checkpoints", "2"]
    _run(tmp_path, data, *keep, "--stop_at_step", "4")
    _run(tmp_path, data, *keep, "--stop_at_step", "8", "--auto_resume")
    _run(tmp_path, data, *keep, "--auto_resume")
    assert [r["step"] for r in metrics(tmp_path / "log", "resume")] == [4, 8]
    assert_same_run(tmp_path, reference, tmp_path, N)
    # retention: exactly the 2 newest committed dirs, `latest` names the newest, no temp dirs
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_00000008", "step_00000010"]


def test_sigkill_between_checkpoints_resumes_bit_exact(tmp_path, data, reference):
    ckpt = tmp_path / "ckpt"
    job = start_train(2, [*ARGS, "--checkpoint_interval", "4", "--data_dir", str(data),
                          "--log_dir", str(tmp_path / "log"), "--checkpoint_dir", str(ckpt)])
    latest = ckpt / "latest"
    try:
        wait_for(lambda: latest.exists() and latest.read_text().strip() == "step_00000004",
                 timeout=120, interval=0.005)
    finally:
        kill_job(job)  # SIGKILL to the whole process group: torchrun and both ranks
    assert job.returncode == -9
    assert latest.read_text().strip() == "step_00000004", "killed too late to test anything"
    _run(tmp_path, data, "--checkpoint_interval", "4", "--auto_resume")
    assert [r["step"] for r in metrics(tmp_path / "log", "resume")] == [4]
    assert_same_run(tmp_path, reference, tmp_path, N)


def test_layout_after_a_run(reference):
    ckpt = reference / "ckpt"
    names = sorted(os.listdir(ckpt))
    assert names == ["latest"] + [f"step_{s:08d}" for s in (2, 4, 6, 8, 10)]  # -1 keeps all
    assert (ckpt / "latest").read_text() == "step_00000010\n"
    for name in names[1:]:
        files = sorted(os.listdir(ckpt / name))
        assert files == [".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp",
                         "__1_1.distcp", "manifest.json"], files  # 2 writer threads per rank
        manifest = json.loads((ckpt / name / "manifest.json").read_text())
        assert manifest["step"] == int(name[5:]) and manifest["world_size"] == 2
        assert sorted(manifest["files"]) == files[:-1]
        for f, entry in manifest["files"].items():
            assert (ckpt / name / f).stat().st_size == entry["size"]
    records = metrics(reference / "log", "checkpoint")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert all(r["bytes"] > 0 and r["seconds"] > 0 for r in records)


def test_per_rank_entries(reference, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    step_dir = reference / "ckpt" / "step_00000004"
    keys = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    for rank in (0, 1):
        assert f"rank_{rank:05d}.torch_cpu" in keys and f"rank_{rank:05d}.json" in keys
    sd = load_checkpoint(step_dir, tmp_path)
    assert not torch.equal(sd["rank_00000.torch_cpu"], sd["rank_00001.torch_cpu"])
    entries = [json.loads(bytes(sd[f"rank_{r:05d}.json"].tolist())) for r in (0, 1)]
    assert entries[0]["rng"]["python"] != entries[1]["rng"]["python"]
    sampler = [e["loader"]["_sampler_iter_state"]["sampler_state"] for e in entries]
    assert [s["rank"] for s in sampler] == [0, 1]
    assert all(s["consumed"] == 4 * 8 for s in sampler)  # 4 steps of 8 samples per rank
    meta = json.loads(bytes(sd["meta"].tolist()))
    assert (meta["step"], meta["world_size"], meta["global_sample_cursor"]) == (4, 2, 4 * 16)
    assert meta["config"]["model"]["n_layer"] == 2


def test_dcp_to_torch_save_weights_match_the_trained_model(reference, tmp_path, data):
    """torch's own converter reads our checkpoint; its weights give the logged val loss."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dcp_train.cli import parse_config
    from dcp_train.data import find_shards, val_batches
    from dcp_train.model import GPT

    out = tmp_path / "consolidated.pt"
    dcp_to_torch_save(str(reference / "ckpt" / "step_00000010"), str(out))
    sd = torch.load(out, weights_only=True)  # no pickle needed: everything is a tensor
    cfg = parse_config([*ARGS])
    model = GPT(cfg.model)
    missing, unexpected = model.load_state_dict(sd["model"], strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to wte: stored once
    model.eval()
    files = find_shards(str(data), "val")
    with torch.no_grad():
        batch_losses = [model(x, y)[1].item() for rank in (0, 1)
                        for x, y in val_batches(files, 32, 4, rank, 2, 2)]
    logged = [r for r in metrics(reference / "log", "val") if r["step"] == 10]
    assert sum(batch_losses) / len(batch_losses) == pytest.approx(logged[0]["loss"], rel=1e-6)


def _fails_cleanly(tmp_path, data, extra, expected):
    ckpt = tmp_path / "ckpt"
    before, log_before = snapshot(ckpt), snapshot(tmp_path / "log")
    proc = subprocess.run([sys.executable, "-m", "dcp_train.main", *ARGS, "--data_dir", str(data),
                           "--log_dir", str(tmp_path / "log"), "--checkpoint_dir", str(ckpt),
                           *extra], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dcp_train: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert snapshot(ckpt) == before
    assert snapshot(tmp_path / "log") == log_before  # a refused start writes no record


def test_resume_missing_path(tmp_path, data):
    _fails_cleanly(tmp_path, data, ["--resume", "--checkpoint_path", str(tmp_path / "nope")],
                   "does not exist")


def test_resume_path_that_is_not_a_checkpoint(tmp_path, data):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("hello")
    _fails_cleanly(tmp_path, data, ["--resume", "--checkpoint_path", str(bogus)],
                   "is not a usable checkpoint")


def test_resume_checkpoint_of_another_model_size(tmp_path, data, reference):
    import shutil

    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    _fails_cleanly(tmp_path, data, ["--auto_resume", "--n_embd", "32"],
                   "--n_embd 32 (the saved run used 64)")
    _fails_cleanly(tmp_path, data, ["--resume", "--checkpoint_path",
                                    str(tmp_path / "ckpt" / "step_00000004"), "--n_layer", "3",
                                    "--drop_newer_checkpoints"],  # past the newer-steps rule
                   "--n_layer 3 (the saved run used 2)")
