"""A fuzz test of every flag the trainer's parser defines (issue 35, docs/errors.md "Flags").

The flags are read from the parser (cli.build_parser) and their types from the config
dataclasses, never from a hand list; the test asserts that it covered every one. Each flag
gets, on the command line and as a key of a TOML file (`--config`), values of the wrong type,
out of range, empty, negative, and paths of the wrong kind. Every case must end as a parsed
Config or as one ConfigError line (never another exception, never a second line); the cases
that are wrong for every flag of a type (a word for a number, -7 for any number, "maybe" for a
bool, a TOML value of another type, a file for a dir flag) must be refused; a TOML value is
refused naming the file. Nothing is created in the checkpoint or log dir.

Parse-time cases run in this process (cli.parse_config, what main() calls first); the
start-time checks (after torch.distributed starts) run as one torchrun job per class: a world
size that does not divide the batch, and a data dir without shards.
"""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from dcp_train import config as C
from dcp_train.cli import build_parser, parse_config
from dcp_train.errors import ConfigError
from helpers import TINY, one_error, run_train, write_shards

FIELDS = {f.name: f for f in fields(C.Config) if f.name not in C.SECTIONS}
FIELDS.update({f.name: f for cls in C.SECTIONS.values() for f in fields(cls)})
SECTION_OF = {f.name: name for name, cls in C.SECTIONS.items() for f in fields(cls)}
PATH_KIND = dict(C._PATHS)  # config.check_paths' own table: the flags that are local paths
PATH_KIND.update({"init_from": "dir"})


def parser_flags() -> set[str]:
    return {o.removeprefix("--") for a in build_parser()._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def command_line_cases(name: str, a_file: str, a_dir: str) -> list[tuple[str, bool]]:
    """[(value, must be refused)] for flag `name`."""
    if name == "config":
        return [(a_dir, True), (a_file, True), ("", True), (a_file + ".missing", True)]
    typ = str(FIELDS[name].type)
    if typ in ("int", "Optional[int]"):
        return [("x", True), ("", True), ("1.5", True), ("-7", True), ("0", False)]
    if typ == "float":
        return [("x", True), ("", True), ("-7", True), ("nan", True), ("0", False)]
    if typ in ("bool", "Optional[bool]"):
        return [("maybe", True), ("", True), ("2", True)]
    cases = [("", name in C._NOT_EMPTY), ("-7", False), ("bogus value", False)]
    kind = PATH_KIND.get(name)
    if kind is not None:
        cases.append((a_file if kind == "dir" else a_dir, True))
    return cases


def toml_cases(name: str) -> list[tuple[str, bool]]:
    """[(TOML value text, must be refused)] for key `name`."""
    typ = str(FIELDS[name].type)
    if typ in ("int", "Optional[int]", "float"):
        return [('"3"', True), ("true", True), ("-7", True), ("[]", True)]
    if typ in ("bool", "Optional[bool]"):
        return [("1", True), ('"maybe"', True), ("[true]", True)]
    return [("5", True), ("true", True), ('""', name in C._NOT_EMPTY), ('"-7"', False)]


def outcome(argv: list[str]):
    """The Config, or the ConfigError's text; any other exception fails the test."""
    try:
        return parse_config(argv)
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text and "Traceback" not in text, (argv, text)
        return text


def test_every_flag_on_the_command_line_and_in_toml(tmp_path, monkeypatch):
    a_file, a_dir = tmp_path / "a_file", tmp_path / "a_dir"
    a_file.write_text("x")
    a_dir.mkdir()
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    base = [*TINY, "--checkpoint_dir", str(ckpt), "--log_dir", str(log)]
    flags = parser_flags()
    assert flags == set(FIELDS) | {"config"}  # every field is a flag, and nothing else
    fuzzed, refused_badly = set(), []
    for name in sorted(flags):
        for value, must_refuse in command_line_cases(name, str(a_file), str(a_dir)):
            result = outcome([*base, f"--{name}", value])
            fuzzed.add(name)
            if must_refuse and not isinstance(result, str):
                refused_badly.append(f"--{name} {value!r} was accepted")
            elif isinstance(result, str) and must_refuse and value and not re.search(
                    rf"--{name}\b|{re.escape(value)}", result):
                refused_badly.append(f"--{name} {value!r}: the line names neither: {result}")
    assert fuzzed == flags
    in_toml = set()
    toml = tmp_path / "run.toml"
    monkeypatch.chdir(tmp_path)  # the file's values alone: the default dirs would be here
    toml.write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in sorted(FIELDS):
        table = f"[{SECTION_OF[name]}]\n" if name in SECTION_OF else ""
        for text, must_refuse in toml_cases(name):
            toml.write_text(f"{table}{name} = {text}\n")
            result = outcome(["--config", str(toml)])
            in_toml.add(name)
            if must_refuse and not isinstance(result, str):
                refused_badly.append(f"TOML {name} = {text} was accepted")
            elif isinstance(result, str) and must_refuse and not result.startswith(
                    f"--config {toml}: "):
                refused_badly.append(f"TOML {name} = {text}: the file is not named: {result}")
    assert in_toml == set(FIELDS)
    assert not refused_badly, "\n".join(refused_badly)
    assert not ckpt.exists() and not log.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", ["world_size", "no_shards"])
def test_start_time_checks_leave_nothing(case, tmp_path):
    """One torchrun job per class of start-time check: one line, exit 2, no checkpoint or log
    dir (the writer lease and metrics.jsonl are made only by a run that starts)."""
    data = write_shards(tmp_path / "data")
    if case == "world_size":  # 256 tokens a step are no multiple of 2 ranks x 3 x 32
        extra, words = ["--total_batch_size", "256", "--batch_size", "3"], \
            "--total_batch_size 256 is not divisible by batch_size*seq_len*world_size"
    else:
        (tmp_path / "empty").mkdir()
        data, extra, words = tmp_path / "empty", [], str(tmp_path / "empty")
    proc = run_train(2, [*TINY, "--max_steps", "2", "--data_dir", str(data), *extra,
                         "--checkpoint_dir", str(tmp_path / "ckpt"),
                         "--log_dir", str(tmp_path / "log")], check=False)
    line = one_error(proc)
    assert words in line, line
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)) == {"2"}, proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "log").exists()
