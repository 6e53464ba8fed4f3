"""Small things of the command lines (issue 13, points 8 and 9): --device cuda without CUDA,
--help defaults, no prefix abbreviations, `dcp-ckpt ... | head`, no false torch warning on a
resume, and the `config` record of every launch.
Run: .venv/bin/python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY, child_env, metrics, run_train, write_shards

import dcp_train
from dcp_train.cli import build_parser, parse_config
from dcp_train.config import redacted_config
from dcp_train.data import prepare
from dcp_train.tools import ckpt, plot, sample
from dcp_train.train import hellaswag

ARGS = [*TINY, "--batch_size", "4", "--total_batch_size", "512", "--checkpoint_interval", "2"]
FALSE_WARNING = "assuming the intent is to load in a single process"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 2 steps as one plain process, resumed to step 3 by a 2-rank torchrun job:
    (log dir, checkpoint dir, the resume's CompletedProcess)."""
    base = tmp_path_factory.mktemp("cli")
    data = write_shards(base / "data")
    args = [*ARGS, "--data_dir", str(data), "--log_dir", str(base / "log"),
            "--checkpoint_dir", str(base / "ckpt")]
    first = subprocess.run([sys.executable, "-m", "dcp_train.main", *args, "--max_steps", "2"],
                           cwd=REPO, env=child_env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(2, [*args, "--max_steps", "3", "--auto_resume"])
    return base / "log", base / "ckpt", resumed


def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "dcp_train.main", *ARGS, "--device", "cuda",
                           "--checkpoint_dir", str(tmp_path / "ckpt")], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"dcp_train: error: --device cuda was given but CUDA is not available "
                           f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                           "use --device cpu or --device auto\n")
    assert not (tmp_path / "ckpt").exists()


def test_help_shows_each_default_once():
    text = " ".join(build_parser().format_help().split())
    assert "(default: block_size) (default: None)" not in text
    assert "--seq_len SEQ_LEN tokens per sequence (default: --block_size) --total_batch_size" \
        in text
    assert text.count("(default:") >= 40 and "(default: continue)" in text


@pytest.mark.parametrize("main, argv, flag", [
    (parse_config, ["--max_step", "3"], "--max_step"),
    (parse_config, ["--keep", "2"], "--keep"),
    (parse_config, ["--async"], "--async"),
    (ckpt.main, ["ls", "/nope", "--jso"], "--jso"),
    (ckpt.main, ["ls", "/nope", "--storage_opt", "{}"], "--storage_opt"),
    (ckpt.main, ["export", "/nope", "--out", "/x", "--dtyp", "bf16"], "--dtyp"),
    (plot.main, ["/nope", "--dp", "50"], "--dp"),
    (prepare.main, ["--ou", "/nope"], "--ou"),
    (sample.main, ["--checkpoint", "/nope", "--promp", "hi"], "--promp"),
    (hellaswag.main, ["--download", "/nope", "--down", "/x"], "--down"),
])
def test_abbreviated_flags_are_refused(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_ends_quietly(run):
    _, ckpt_dir, _ = run
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "dcp_train.ckpt", "inspect",
                               str(ckpt_dir)], cwd=REPO, env=child_env(), stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == ckpt.EXIT_BROKEN_PIPE and proc.stderr == ""
    # and through a real shell pipe
    shell = subprocess.run(f"{sys.executable} -m dcp_train.ckpt inspect {ckpt_dir} | head -2",
                           shell=True, cwd=REPO, env=child_env(), capture_output=True,
                           text=True, timeout=120)
    assert shell.stdout.startswith("checkpoint ") and shell.stderr == ""


def test_no_false_torch_warning_on_resume(run):
    _, _, resumed = run
    assert "resumed from" in resumed.stdout
    assert FALSE_WARNING not in resumed.stdout + resumed.stderr


def test_every_launch_starts_with_a_config_record(run):
    log, _, _ = run
    records = metrics(log)
    starts = [i for i, r in enumerate(records) if r["kind"] == "config"]
    assert len(starts) == 2 and starts[0] == 0
    assert records[starts[1] + 1]["kind"] == "resume"  # the second launch's first records
    first, second = records[starts[0]], records[starts[1]]
    for record, world, max_steps in ((first, 1, 2), (second, 2, 3)):
        assert record["world_size"] == world and record["device"] == "cpu"
        assert record["torch"] == torch.__version__
        assert record["dcp_train"] == dcp_train.__version__
        assert record["config"]["max_steps"] == max_steps
    expected = redacted_config(parse_config([*ARGS, "--max_steps", "3", "--auto_resume",
                                             "--data_dir", second["config"]["data_dir"],
                                             "--log_dir", str(log), "--checkpoint_dir",
                                             second["config"]["checkpoint_dir"]]))
    assert second["config"] == json.loads(json.dumps(expected))
