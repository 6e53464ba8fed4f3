"""The supported torch range (torch_compat.py): the running torch passes, versions outside the
range and a torch that lacks a private DCP part are refused with one clear line, exit 2."""

import re
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, TINY, child_env
from dcp_train import torch_compat as T


def test_running_torch_is_supported_and_complete():
    assert T.range_problem(torch.__version__) is None
    assert T.missing_parts() == []
    T.require_dcp_internals()


def test_range_ends_and_version_strings():
    assert T.range_problem("2.11.0+cu126") is None  # the lowest supported release
    assert T.range_problem("2.13.0+cpu") is None  # the highest tested
    assert "older than the lowest supported 2.11" in T.range_problem("2.10.1")
    newer = T.range_problem("2.14.0.dev20260901+cu128")
    assert "newer than the highest tested 2.13" in newer and T.ALLOW_UNTESTED in newer
    assert T.range_problem("2.14.1", allow_untested=True) is None


def test_range_matches_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"torch([<>=][^"]*)"', text)
    lo, hi = T.LOWEST, T.HIGHEST_TESTED
    assert pins == [f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"], pins


def test_missing_private_parts_are_named():
    needed = [("torch.distributed.checkpoint.filesystem", "FileSystemWriter",
               ("thread_count", "no_such_param")),
              ("torch.distributed.checkpoint.no_such_module", "Thing", ()),
              ("torch.distributed.checkpoint.filesystem", "FileSystemReader.no_such_method", ())]
    assert T.missing_parts(needed) == [
        "torch.distributed.checkpoint.filesystem.FileSystemWriter(no_such_param)",
        "torch.distributed.checkpoint.no_such_module.Thing",
        "torch.distributed.checkpoint.filesystem.FileSystemReader.no_such_method"]


def _main_with_torch_version(version: str, tmp_path: Path, env=None):
    """dcp_train.main in a real process whose torch reports `version`."""
    code = ("import sys, torch; torch.__version__ = sys.argv[1]; "
            "from dcp_train.main import main; main(sys.argv[2:])")
    return subprocess.run(
        [sys.executable, "-c", code, version, *TINY, "--max_steps", "1",
         "--log_dir", str(tmp_path / "log"), "--checkpoint_dir", str(tmp_path / "ckpt")],
        cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=120)


def test_main_refuses_a_torch_outside_the_range(tmp_path):
    for version, expected in [("2.10.0", "older than the lowest supported 2.11"),
                              ("2.15.0", "newer than the highest tested 2.13")]:
        proc = _main_with_torch_version(version, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dcp_train: error: torch " + version)
        assert expected in lines[0]
        assert not (tmp_path / "ckpt").exists() and not (tmp_path / "log").exists()


def test_async_stager_survives_a_per_save_close():
    """torch 2.11's DefaultStager._stage ends with StateDictStager.close() (it clears the copy
    dispatch table): a plain stager then fails at its second save with KeyError <class 'type'>
    (seen on an H200, bench/results_gpu.md). reusable_stager keeps working and keeps its
    staging buffers from save to save; close_stager releases them."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from dcp_train.checkpoint.async_save.save_process import close_stager, reusable_stager

    state = {"model": {"w": torch.arange(6.0)}, "progress": {"step": 3, "ids": [1, 2]}}
    plain = DefaultStager(StagingOptions(False, False, False, False))
    plain.stage(state)
    plain._state_dict_stager.close()  # what torch 2.11 does after every stage
    try:
        plain.stage(state)
        raise AssertionError("expected the cleared dispatch table to fail the second stage")
    except KeyError as e:
        assert e.args[0] is type
    stager = reusable_stager(False)
    try:
        staged = []
        for step in (4, 5):
            state["model"]["w"] += 1
            state["progress"]["step"] = step
            stager._state_dict_stager.close()  # the per-save close, as in torch 2.11
            staged.append(stager.stage(state).result())
            assert torch.equal(staged[-1]["model"]["w"], state["model"]["w"])
            assert staged[-1]["progress"] == {"step": step, "ids": [1, 2]}
        ptrs = [s["model"]["w"].untyped_storage().data_ptr() for s in staged]
        assert ptrs[0] == ptrs[1]  # the same staging buffer, reused
    finally:
        close_stager(stager)
    assert not stager._state_dict_stager._cached_storage_mapping
