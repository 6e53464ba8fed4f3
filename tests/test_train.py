"""The trainer foundation: a real 2-rank torchrun learns; metrics follow docs/design.md; the loss
does not depend on the world size; bad flags give one clear error line."""

import subprocess
import sys

import pytest

from helpers import REPO, TINY, child_env, metrics, run_train, write_shards

TRAIN_FIELDS = {"kind", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                "tokens_per_s_per_device", "mfu"}


def test_help_lists_every_flag_with_default():
    from dataclasses import fields

    from dcp_train.config import SECTIONS, Config

    out = subprocess.run([sys.executable, "-m", "dcp_train.main", "--help"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    flags = [f for f in fields(Config) if f.name not in SECTIONS]
    flags += [f for cls in SECTIONS.values() for f in fields(cls)]
    for f in flags:
        assert f"--{f.name}" in text, f.name
    assert text.count("(default:") >= len(flags) - 1


def test_tiny_preset_learns_on_two_ranks(tmp_path):
    """The issue's command: --preset tiny --max_steps 50 on the embedded default corpus."""
    log = tmp_path / "log"
    data = tmp_path / "data"
    from dcp_train.data.prepare import ensure_default_data

    ensure_default_data(str(data))  # what the default --data_dir does on first use
    run_train(2, ["--preset", "tiny", "--max_steps", "50", "--data_dir", str(data),
                  "--log_dir", str(log), "--checkpoint_dir", str(tmp_path / "ckpt"),
                  "--generate_interval", "50"], timeout=400)
    records = metrics(log)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 51))
    for r in train.values():
        assert TRAIN_FIELDS <= set(r)
    assert train[50]["loss"] < train[1]["loss"] - 3.0, (train[1]["loss"], train[50]["loss"])
    assert train[50]["tokens"] == 50 * 1024
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [25, 50] and all(isinstance(v["loss"], float) for v in vals)
    ckpts = [r for r in records if r["kind"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [25, 50]
    assert all({"path", "seconds", "bytes"} <= set(c) for c in ckpts)
    times = [r["time"] for r in records]  # every kind carries the Unix time it was logged at
    assert all(isinstance(t, float) for t in times) and times == sorted(times)
    assert {r["kind"] for r in records} >= {"config", "train", "val", "checkpoint"}


def test_loss_does_not_depend_on_world_size(tmp_path):
    data = write_shards(tmp_path / "data")
    args = [*TINY, "--dropout", "0", "--max_steps", "4", "--batch_size", "2",
            "--total_batch_size", "256", "--data_dir", str(data)]
    run_train(1, [*args, "--log_dir", str(tmp_path / "w1"), "--checkpoint_dir", str(tmp_path / "c1")])
    run_train(2, [*args, "--log_dir", str(tmp_path / "w2"), "--checkpoint_dir", str(tmp_path / "c2")])
    one = [r for r in metrics(tmp_path / "w1") if r["kind"] == "train"]
    two = [r for r in metrics(tmp_path / "w2") if r["kind"] == "train"]
    assert [r["batch_digest"] for r in one] == [r["batch_digest"] for r in two]
    for a, b in zip(one, two):
        # the same samples and updates; only the float reduction order differs
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)


def _one_line_error(proc, expected: str):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dcp_train: error:")]
    assert lines, proc.stderr[-3000:]
    assert len(set(lines)) == 1 and expected in lines[0], lines


def _plain(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "dcp_train.main", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_unknown_preset(tmp_path):
    _one_line_error(_plain(["--preset", "huge"], tmp_path), "unknown --preset 'huge'")


def test_missing_data_dir(tmp_path):
    proc = _plain([*TINY, "--data_dir", str(tmp_path / "nope"), "--log_dir", str(tmp_path / "l"),
                   "--checkpoint_dir", str(tmp_path / "c")], tmp_path)
    _one_line_error(proc, str(tmp_path / "nope"))
    assert not (tmp_path / "c").exists()


def test_non_dividing_batch(tmp_path):
    data = write_shards(tmp_path / "data")
    proc = run_train(2, [*TINY, "--batch_size", "3", "--total_batch_size", "256",
                         "--data_dir", str(data), "--log_dir", str(tmp_path / "l"),
                         "--checkpoint_dir", str(tmp_path / "c")], check=False)
    _one_line_error(proc, "--total_batch_size 256 is not divisible by")


@pytest.mark.parametrize("args,expected", [
    (["--total_batch_size", "100", "--seq_len", "32"], "not a multiple of --seq_len"),
    (["--resume"], "--resume needs --checkpoint_path"),
    (["--resume", "--auto_resume", "--checkpoint_path", "x"], "contradict"),
    (["--n_embd", "65"], "not divisible by --n_head"),
    (["--storage_options", "[1]"], "--storage_options must be a JSON object"),
])
def test_contradicting_flags(tmp_path, args, expected):
    _one_line_error(_plain([*TINY, *args], tmp_path), expected)
