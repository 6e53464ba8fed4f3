"""Format versioning: checkpoints written by older code still load and continue bit for bit;
a checkpoint from a newer, unknown format version is one clear error (test_start_rules.py).

Floating-point bits differ between CPU types (AVX2, AVX-512, AMX), so no bit comparison here is
against bits stored in the fixture: both sides of each are computed in the test run."""

import json
import shutil
from pathlib import Path

import torch
from helpers import (TINY, assert_same_tensors, load_checkpoint, metrics, rank_rng, run_train,
                     write_shards)

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
ARGS = [*TINY, "--n_embd", "16", "--dropout", "0.1", "--batch_size", "4",
        "--total_batch_size", "512", "--max_steps", "4", "--checkpoint_interval", "2"]


def _copy_fixture(root: Path) -> Path:
    ckpt = root / "ckpt"
    shutil.copytree(FIXTURE / "step_00000002", ckpt / "step_00000002")
    (ckpt / "latest").write_text("step_00000002\n")
    return ckpt


def _train_records(log_dir: Path) -> dict[int, tuple]:
    """step -> (loss, grad_norm, batch_digest) of the train records; a repeated step keeps
    the last."""
    return {r["step"]: (r["loss"], r["grad_norm"], r["batch_digest"])
            for r in metrics(log_dir, "train")}


def test_format1_checkpoint_resumes_bit_exact(tmp_path):
    """The fixture (written by the code before the checkpoint manager) resumes at 2 ranks.
    Reference: the same resume stopped after step 3 (saved in today's format) and resumed
    again; steps 3 and 4 and the final state must be the same bits, both computed here."""
    data = write_shards(tmp_path / "data")
    common = [*ARGS, "--data_dir", str(data), "--auto_resume"]
    straight, ckpt = tmp_path / "straight", _copy_fixture(tmp_path / "straight")
    run_train(2, [*common, "--log_dir", str(straight / "log"), "--checkpoint_dir", str(ckpt)])
    stopped, ckpt_b = tmp_path / "stopped", _copy_fixture(tmp_path / "stopped")
    for extra in (["--stop_at_step", "3"], []):
        run_train(2, [*common, *extra, "--log_dir", str(stopped / "log"),
                      "--checkpoint_dir", str(ckpt_b)])

    resumes = metrics(straight / "log", "resume")
    assert [(r["step"], Path(r["path"]).name, r["world_size_saved"], r["rng"], r["note"])
            for r in resumes] == [(2, "step_00000002", 2, "restored", "")]
    assert [r["step"] for r in metrics(stopped / "log", "resume")] == [2, 3]
    got, ref = _train_records(straight / "log"), _train_records(stopped / "log")
    assert sorted(got) == [3, 4] and got == ref
    final = load_checkpoint(ckpt / "step_00000004", tmp_path)
    assert_same_tensors(final, load_checkpoint(ckpt_b / "step_00000004", tmp_path),
                        prefixes=("model.", "optim.", "rank_"))
    # what was restored is the fixture's own per-rank state, not a fresh seed: training draws
    # only from torch's generator, so the numpy and Python states pass through unchanged
    # (integers, the same on every CPU)
    fixture = load_checkpoint(FIXTURE / "step_00000002", tmp_path)
    for rank in (0, 1):
        assert rank_rng(final, rank)[1] == rank_rng(fixture, rank)[1]
    meta = json.loads(bytes(final["meta"].numpy().tobytes()).decode())
    assert (meta["step"], meta["tokens"], meta["world_size"]) == (4, 4 * 512, 2)
    assert not torch.equal(final["model.transformer.wte.weight"],
                           fixture["model.transformer.wte.weight"])  # it trained
