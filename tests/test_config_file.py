"""--config FILE.toml: run settings from a TOML file with the config sections as tables.

- configs/tiny.toml and configs/gpt2-124m.toml resolve to exactly the configuration their
  preset gives on the command line;
- flags on the command line override the file (a dimension from the file counts as given);
- unknown keys and tables, wrong types, a file that is not TOML or not there: one error
  naming the file and the key; through `python -m dcp_train.main`, one line and exit 2;
- a 2-rank run from configs/tiny.toml (plus command-line overrides) equals the same run from
  flags bit for bit: every loss, the val losses, the final model and optimizer tensors, and
  the `config` record.

Run: .venv/bin/python -m pytest tests/test_config_file.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dcp_train.cli import parse_config
from dcp_train.config import as_record
from dcp_train.errors import ConfigError
from helpers import (REPO, assert_same_tensors, child_env, load_checkpoint, metrics, of_kind,
                     run_train, write_shards)

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m"])
def test_example_files_are_the_presets(preset):
    from_file = parse_config(["--config", str(CONFIGS / f"{preset}.toml")])
    assert as_record(from_file) == as_record(parse_config(["--preset", preset]))


def test_flags_override_the_file(tmp_path):
    cfg = parse_config(["--config", str(CONFIGS / "tiny.toml"), "--max_steps", "7",
                        "--n_layer", "3", "--checkpoint_dir", str(tmp_path), "--wandb=false"])
    assert (cfg.training.max_steps, cfg.model.n_layer, cfg.checkpoint.checkpoint_dir) == \
        (7, 3, str(tmp_path))
    assert (cfg.training.batch_size, cfg.model.n_embd, cfg.eval.eval_interval) == (8, 64, 25)
    short = tmp_path / "short.toml"
    short.write_text('[model]\nn_layer = 4\n[checkpoint]\nauto_resume = true\n'
                     '[hardware]\ncompile = "auto"\n')
    cfg = parse_config(["--config", str(short), "--preset", "tiny"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.checkpoint.auto_resume,
            cfg.hardware.compile) == (4, 64, True, None)  # the rest from --preset tiny


@pytest.mark.parametrize("text, words", [
    ("[training]\nmax_stepz = 3\n", "unknown key 'max_stepz' in [training]"),
    ("[trainer]\nmax_steps = 3\n", "unknown key 'trainer'"),
    ("max_steps = 3\n", "unknown key 'max_steps'"),
    ("[training]\nmax_steps = \"3\"\n", "[training] max_steps must be an integer, got '3'"),
    ("[training]\nmax_lr = true\n", "[training] max_lr must be a number, got True"),
    ("[checkpoint]\nauto_resume = 1\n", "[checkpoint] auto_resume must be true or false"),
    ("[model\nn_layer = 3\n", "is not valid TOML"),
    ("storage_options = [\"key\", \"s3cr3t\"]\n", "storage_options must be a string, got a "
                                                   "TOML list"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(path)])
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    assert "s3cr3t" not in str(e.value)


@pytest.mark.parametrize("text, says", [
    ("[checkpoint]\nstall_timeout = -3.0\n",
     "[checkpoint] stall_timeout must be seconds >= 1, got -3.0"),
    ("[training]\nmax_steps = 0\n", "[training] max_steps must be >= 1, got 0"),
    ("[logging]\nlog_dir = \" \"\n", "[logging] log_dir is empty; give a path"),
    ('storage_options = "{key: s3cr3t}"\n',
     "storage_options is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)); write a TOML table (storage_options = {key = \"value\"}) or "
     "a JSON object as a TOML string"),
])
def test_range_errors_name_the_file_and_the_key(tmp_path, text, says):
    """A value from the file that a check refuses is said of the file's key, with advice in
    TOML's terms (not the shell's); the same value given as a flag is said of the flag."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(path)])
    assert str(e.value) == f"--config {path}: {says}"
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(CONFIGS / "tiny.toml"), "--stall_timeout", "-3"])
    assert str(e.value) == "--stall_timeout must be seconds >= 1, got -3.0"


def test_one_error_line_and_exit_2(tmp_path):
    for path, words in [(tmp_path / "nope.toml", "cannot read it"),
                        (tmp_path / "bad.toml", "unknown key 'n_layers' in [model]")]:
        if path.name == "bad.toml":
            path.write_text("[model]\nn_layers = 3\n")
        proc = subprocess.run([sys.executable, "-m", "dcp_train.main", "--config", str(path)],
                              cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"dcp_train: error: --config {path}") and words in line, line


def test_run_from_toml_equals_run_from_flags(tmp_path):
    data = write_shards(tmp_path / "data")
    same = ["--max_steps", "4", "--checkpoint_interval", "2", "--eval_interval", "2",
            "--generate_interval", "0", "--hellaswag_interval", "0", "--data_dir", str(data)]

    def run(name, *how):
        run_train(2, [*how, *same, "--log_dir", str(tmp_path / name / "log"),
                      "--checkpoint_dir", str(tmp_path / name / "ckpt")])
        return metrics(tmp_path / name / "log")

    from_file = run("file", "--config", str(CONFIGS / "tiny.toml"))
    from_flags = run("flags", "--preset", "tiny")
    records = [[r for r in m if r["kind"] in ("train", "val")] for m in (from_file, from_flags)]
    keep = ("kind", "step", "loss", "lr", "grad_norm", "tokens", "batch_digest")  # no timings
    records = [[{k: v for k, v in r.items() if k in keep} for r in rs] for rs in records]
    assert records[0] == records[1] and len(of_kind(records[0], "train")) == 4
    (config_file,), (config_flags,) = ([r["config"] for r in of_kind(m, "config")]
                                       for m in (from_file, from_flags))
    for c in (config_file, config_flags):
        del c["log_dir"], c["checkpoint_dir"]
    assert config_file == config_flags
    assert_same_tensors(load_checkpoint(tmp_path / "file" / "ckpt" / "step_00000004", tmp_path),
                        load_checkpoint(tmp_path / "flags" / "ckpt" / "step_00000004", tmp_path))
