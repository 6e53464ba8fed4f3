"""launch/gpu_check.sh, the parts a CPU machine can check (the check itself needs a GPU;
`bash launch/gpu_check.sh --device cpu --tiny` runs its whole flow in minutes, too slow here):
without CUDA it stops at once with one line, exit 2; and the dependencies it makes sure of
before it starts cover every runtime dependency in pyproject.toml, so a GPU machine that
lacks one gets it installed from the wheels instead of failing at the first import (the H200
image has no crc32c, which the list once missed).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement

from helpers import REPO, child_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCRIPT = REPO / "launch" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_one_line_exit_2():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                          env=child_env({"PYTHON": sys.executable}), timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("gpu_check: error: CUDA is not available to "), proc.stderr
    assert "--device cpu --tiny" in proc.stderr


def test_checked_imports_cover_the_runtime_dependencies():
    need = re.search(r'^_need="import ([^"]+)"$', SCRIPT.read_text(), re.M)
    assert need, "launch/gpu_check.sh lost its _need line"
    checked = {name.strip() for name in need[1].split(",")}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = set()
    for dep in map(Requirement, deps):
        for python in ("3.11", "3.12", "3.13"):  # GPU images' Pythons (3.10's tomli: not)
            if dep.marker is None or dep.marker.evaluate({"python_version": python}):
                required.add(dep.name.replace("-", "_"))  # each one's import name
    assert "crc32c" in required and "torchdata" in required
    assert required <= checked, f"not checked by launch/gpu_check.sh: {required - checked}"
