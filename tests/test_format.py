"""Format versioning: checkpoints written by older code still load and continue bit for bit;
a checkpoint from a newer, unknown format version is one clear error."""

import json
import shutil
from pathlib import Path

from helpers import (TINY, assert_same_tensors, load_checkpoint, losses, run_train,
                     write_shards)

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
ARGS = [*TINY, "--n_embd", "16", "--dropout", "0.1", "--batch_size", "4",
        "--total_batch_size", "512", "--max_steps", "4", "--checkpoint_interval", "2"]


def _copy_fixture(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "step_00000002", ckpt / "step_00000002")
    (ckpt / "latest").write_text("step_00000002\n")
    return ckpt


def test_format1_checkpoint_resumes_bit_exact(tmp_path):
    data = write_shards(tmp_path / "data")
    ckpt = _copy_fixture(tmp_path)
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), "--auto_resume"])
    expected = {int(k): v for k, v in json.loads((FIXTURE / "losses.json").read_text())
                ["losses"].items()}
    got = losses(tmp_path / "log")
    assert sorted(got) == [3, 4]
    assert got == {3: expected[3], 4: expected[4]}
    assert_same_tensors(load_checkpoint(FIXTURE / "step_00000004_expected", tmp_path),
                        load_checkpoint(ckpt / "step_00000004", tmp_path))
