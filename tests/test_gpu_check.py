"""launch/gpu_check.sh, on CPU: the rehearsal runs every part of the GPU check with tiny sizes
(one JSON line per part, on stdout and in $OUT/gpu_check.jsonl, the children's output in
$OUT/logs/); a SIGTERM kills the child tree in flight and writes what the check has; the
check's one clock; the preflight's refusal; without CUDA one line, exit 2; the dependencies it
installs cover pyproject's. Plus the pieces of the fixes a CPU can check: a child out of GPU
memory is told apart and the batch halved, the CUDA RNG state of the current device only (an
older checkpoint's stack of every device still restores), docs/gpus.md's numbers.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from packaging.requirements import Requirement

from helpers import REPO, child_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCRIPT = REPO / "launch" / "gpu_check.sh"
PARTS = ["env", "speed", "ckpt", "exact", "pinned", "deterministic"]
LIMIT_S = 300  # the bound for the whole rehearsal


def _check(out, *args, env=None):
    return subprocess.Popen(["bash", str(SCRIPT), "--rehearse", "--workdir", str(out / "work"),
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env({"PYTHON": sys.executable, "OUT": str(out),
                                                      **(env or {})}))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t = time.monotonic()
    proc = _check(out)
    try:
        stdout, stderr = proc.communicate(timeout=LIMIT_S + 60)  # its output if it is late
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr, out, time.monotonic() - t


def test_rehearsal_every_part_ok(rehearsal):
    rc, stdout, stderr, out, seconds = rehearsal
    assert rc == 0, (stdout, stderr)
    assert seconds < LIMIT_S
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert [x["part"] for x in lines] == PARTS
    assert {x["part"]: x["status"] for x in lines} == dict.fromkeys(PARTS, "ok"), lines
    stored = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert stored == lines
    for part in PARTS[1:]:  # every child's output, one log per part
        assert "\n# exit 0 after " in (out / "logs" / f"{part}.log").read_text()
    assert not (out / "work").exists()  # the scratch dir is removed


def test_rehearsal_figures(rehearsal):
    lines = {x["part"]: x for x in map(json.loads, (rehearsal[3] / "gpu_check.jsonl").open())}
    env, speed, ckpt = lines["env"], lines["speed"], lines["ckpt"]
    assert env["rehearsal"] is True and env["alloc_conf"] == "expandable_segments:True"
    assert speed["ours_tokens_per_s"] > 0 and speed["plain_tokens_per_s"] > 0
    assert speed["batch"] == 4 and speed["batch_oom"] == [] and speed["compiled"] is False
    assert speed["peak_measured_flops"] > 0 and speed["peak_datasheet_flops"] is None
    # item 5: the first save apart; each save's clock started before its state was gathered
    assert ckpt["first_save"] == ckpt["saves"][0] and ckpt["first_save"]["step"] == 4
    assert [s["step"] for s in ckpt["saves"]] == [4, 8, 12]
    assert all(s["async"] and s["blocked_s"] >= s["gather_s"] > 0 for s in ckpt["saves"])
    assert ckpt["save_gbps"] > 0 and ckpt["raw_read_gbps"] > 0
    # item 4: an honest label, the comparison of the runs that ended
    exact = lines["exact"]
    assert exact["compiled"] is False and "DeterministicStep" in exact["compiled_why"]
    assert exact["losses_equal"] and exact["tensors_differing"] == [] and exact["resumed_at"] == [4]
    assert exact["steps"] == [5, 6, 7, 8] and exact["tensors_compared"] > 100
    determ = lines["deterministic"]
    assert determ["ref_from"] == "exact" and determ["steps"] == list(range(1, 9))
    # item 3: the stager's threshold read from this torch; AdamW's 4-byte step scalars are
    # staged but not eligible for pinning; nothing is pinned on CPU
    pinned = lines["pinned"]
    default = inspect.signature(torch.distributed.checkpoint._state_dict_stager.StateDictStager
                                ).parameters["pin_memory_min_bytes"].default
    assert pinned["pin_memory_min_bytes"] == default == 5
    assert 0 < pinned["eligible"] < pinned["staged_tensors"] and pinned["pinned"] == 0


def _cmdline(pid) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:  # gone
        return b""


def _tree(*markers: str) -> list[int]:
    """Live (not zombie) processes whose command line names every one of `markers`."""
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
            if all(m.encode() in _cmdline(pid) for m in markers)]


def test_sigterm_kills_the_child_tree_and_writes_what_it_has(tmp_path):
    """SIGTERM while our trainer (torchrun and its worker, in a session of its own) runs in
    the speed part: both are killed, the part in progress is written as failed, the rest as
    skipped, exit 143."""
    work = str(tmp_path / "work")
    proc = _check(tmp_path, "--parts", "env,speed,ckpt")
    first = proc.stdout.readline()
    assert json.loads(first)["part"] == "env"
    bound = time.monotonic() + 200
    while len(_tree(work, "dcp_train.main")) < 2:  # torchrun and its worker are both up
        assert proc.poll() is None and time.monotonic() < bound, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # bash exec'd python: this is the check itself
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [json.loads(first), *map(json.loads, stdout.splitlines())] == lines
    assert [(x["part"], x["status"], x.get("reason")) for x in lines] == [
        ("env", "ok", None), ("speed", "failed", "stopped by SIGTERM"),
        ("ckpt", "skipped", "stopped by SIGTERM")]
    assert "plain_tokens_per_s" in lines[1]  # what the part had measured is kept
    assert "# killed: the check was stopped" in (tmp_path / "logs" / "speed.log").read_text()
    assert _tree(work) == []


def test_one_clock_from_before_the_imports(tmp_path):
    """The deadline counts from $GPU_CHECK_T0 (set by the script before anything starts):
    a clock already past it skips every part, and skipped is not failed."""
    proc = _check(tmp_path, "--parts", "speed,exact",
                  env={"GPU_CHECK_T0": str(time.time() - 1000)})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert [(x["part"], x["status"]) for x in lines] == [("speed", "skipped"),
                                                        ("exact", "skipped")]
    assert all("deadline" in x["reason"] for x in lines)


def test_preflight_refuses_in_one_line_without_the_wheels(tmp_path):
    """pip download against an index that refuses connections (no config, no local wheels)."""
    env = child_env({"PYTHON": sys.executable, "DCP_TRAIN_WHEELS": str(tmp_path),
                     "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0",
                     "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    env.pop("PIP_FIND_LINKS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--preflight"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("gpu_check: error: no torchdata 0.11.0 wheel for Python 3.12")


def test_a_child_out_of_gpu_memory_is_told_apart_and_the_batch_halved(tmp_path):
    from bench.gpu_child import CheckFailed, ChildFailed, ChildOOM, Children
    from bench.gpu_parts import with_batch_fallback
    kids = Children(tmp_path)
    oom = [sys.executable, "-c", "import torch; raise torch.OutOfMemoryError("
           "'CUDA out of memory. Tried to allocate 6.15 GiB')"]
    with pytest.raises(ChildOOM):
        kids.run(oom, "oom", 60)
    with pytest.raises(ChildFailed) as e:
        kids.run([sys.executable, "-c", "raise SystemExit(3)"], "oom", 60)
    assert not isinstance(e.value, ChildOOM)
    assert "OutOfMemoryError" in (tmp_path / "oom.log").read_text()

    def measure(batch):  # a real child that runs out of memory above batch 16
        kids.run(oom if batch > 16 else [sys.executable, "-c", "pass"], "fit", 60)
        return batch * 10

    tried = []
    assert with_batch_fallback([64, 32, 16], measure, tried) == (16, 160) and tried == [64, 32]
    with pytest.raises(CheckFailed):
        with_batch_fallback([64], measure, [])


def test_cuda_rng_state_of_the_current_device_only():
    from dcp_train.checkpoint.rng import capture, cuda_state
    from dcp_train.errors import CheckpointError
    one, stack = torch.arange(16, dtype=torch.uint8), torch.arange(48, dtype=torch.uint8)
    assert torch.equal(cuda_state(one, 3), one)  # this format: the saving rank's device
    stack = stack.view(3, 16)  # older checkpoints: every visible device's, one row each
    assert torch.equal(cuda_state(stack, 2), stack[2])
    assert torch.equal(cuda_state(stack[:1], 5), stack[0])  # one device was visible
    with pytest.raises(CheckpointError, match="CUDA_VISIBLE_DEVICES"):
        cuda_state(stack, 3)
    if torch.cuda.is_available():
        torch.cuda.init()
        assert capture()[0]["cuda"].dim() == 1


def test_docs_quote_the_check_s_deadlines():
    from bench.gpu_check import GPU
    doc = (REPO / "docs" / "gpus.md").read_text()
    outer = int(re.search(r"timeout -k \d+ (\d+) bash launch/gpu_check\.sh", doc)[1])
    call = int(re.search(r"timeout_s[`=: ]+(\d+)", doc)[1])
    assert f"deadline of {GPU['deadline']} s" in doc
    assert GPU["deadline"] + 15 <= outer and outer + 15 <= call <= 600


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_one_line_exit_2():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                          env=child_env({"PYTHON": sys.executable}), timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("gpu_check: error: CUDA is not available to "), proc.stderr
    assert "--rehearse" in proc.stderr


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
