"""--deterministic: the same bits on every world size that divides the step's micro-batches.

Real `torchrun` jobs on CPU/gloo, the tiny model with --dropout 0.1. A step is 24 samples
(--total_batch_size 768 / --seq_len 32) in V = 12 micro-batches of --batch_size 2, so world
sizes 1, 2, 3, 4, 6 and 12 work. 100 samples: an epoch boundary falls inside step 5.

    w1   W=1  steps 1..6                       the reference (saves 3, 6)
    w2   W=2  steps 1..6, --num_workers 2      (saves 3, 6)
    w4   W=4  steps 1..6                       (saves 3, 6)
    w3   W=3  steps 1..6
    w6   W=6  steps 1..6
    2to4 W=4  w2/step_3 -> steps 4..6          stopped at 2 ranks, resumed at 4
    4to1 W=1  w4/step_3 -> steps 4..6          stopped at 4 ranks, resumed at 1

Every run's loss and grad norm at every step are == the reference's, and its step-6 model and
optimizer state are torch.equal to the reference's. Every run also evaluates (FSDP forward, no
backward) at steps 2, 4, 6 (4to1: at 6 only): a resumed run's val loss equals that of the
uninterrupted run at the same world size, whose previous evaluation must not leave stale
parameters behind. No tolerance anywhere: in the default mode
the same runs differ in the last bits (tests/test_world_size.py), here they must not.

Run: .venv/bin/python -m pytest tests/test_deterministic.py -q -x
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcp_train.cli import parse_config
from dcp_train.errors import ConfigError
from dcp_train.checkpoint.resume_rules import check_deterministic
from dcp_train.train.deterministic import micro_batches_per_step
from helpers import (REPO, TINY, assert_same_tensors, child_env, load_checkpoint, metrics,
                     run_train, snapshot, step_dir, write_shards)

SEQ = 32
ARGS = TINY + ["--dropout", "0.1", "--total_batch_size", "768", "--batch_size", "2",
               "--max_steps", "6", "--checkpoint_interval", "3", "--seed", "4242",
               "--eval_interval", "2", "--val_steps", "2", "--deterministic"]


def val_losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(log, "val")}


def train_records(log: Path) -> dict[int, tuple[float, float, str]]:
    """step -> (loss, grad_norm, batch_digest)."""
    return {r["step"]: (r["loss"], r["grad_norm"], r["batch_digest"])
            for r in metrics(log, "train")}


class Runs:
    """Each run launched once per module, on first use."""

    def __init__(self, base: Path):
        self.base = base
        self.data = write_shards(base / "data", n_train_tokens=2 * (50 * SEQ + 1))
        self.done: dict[str, Path] = {}

    def run(self, name: str, nproc: int, extra: list[str] = ()) -> Path:
        """The run's base dir (log/, ckpt/)."""
        if name not in self.done:
            d = self.base / name
            run_train(nproc, ARGS + ["--data_dir", str(self.data), "--log_dir", str(d / "log"),
                                     "--checkpoint_dir", str(d / "ckpt"), *extra])
            self.done[name] = d
        return self.done[name]

    def resumed(self, name: str, nproc: int, source: str, extra: list[str]) -> Path:
        return self.run(name, nproc, ["--resume", "--checkpoint_path",
                                      str(step_dir(self.done[source] / "ckpt", 3)), *extra])

    def launch(self, nproc: int, extra: list[str]):
        return run_train(nproc, ARGS + ["--data_dir", str(self.data), *extra], check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    r = Runs(tmp_path_factory.mktemp("deterministic"))
    r.run("w1", 1)
    return r


def assert_identical(ref: Path, got: Path, steps: range, tmp: Path) -> None:
    want, have = train_records(ref / "log"), train_records(got / "log")
    assert sorted(have) == list(steps)
    for s in steps:
        assert have[s] == want[s], (s, have[s], want[s])  # loss, grad norm, batch: ==
    final = step_dir(got / "ckpt", 6)
    assert_same_tensors(load_checkpoint(step_dir(ref / "ckpt", 6), tmp),
                        load_checkpoint(final, tmp))


@pytest.mark.parametrize("world,extra", [(2, ["--num_workers", "2"]), (4, []), (3, []), (6, [])])
def test_any_world_size_gives_the_same_bits(runs, world, extra, tmp_path):
    got = runs.run(f"w{world}", world, extra)
    assert_identical(runs.done["w1"], got, range(1, 7), tmp_path)


@pytest.mark.parametrize("name,world,source,evals", [("2to4", 4, "w2", [4, 6]),
                                                     ("4to1", 1, "w4", [6])])
def test_stopped_and_resumed_on_another_world_size(runs, name, world, source, evals, tmp_path):
    runs.run(source, int(source[1]), ["--num_workers", "2"] if source == "w2" else [])
    # 4to1 evaluates at step 6 only: the first FSDP forward of its process, where w1's step-6
    # evaluation follows the one at step 4 (no save in between)
    got = runs.resumed(name, world, source, ["--eval_interval", "3"] if name == "4to1" else [])
    assert_identical(runs.done["w1"], got, range(4, 7), tmp_path)
    [record] = metrics(got / "log", "resume")
    assert (record["world_size_saved"], record["world_size"]) == (int(source[1]), world)
    # val loss depends on the world size (each rank's val batches): compare at the same one
    same_world = runs.run(f"w{world}", world, [])
    want = val_losses(same_world / "log")
    assert val_losses(got / "log") == {s: want[s] for s in evals}


def test_a_world_size_that_does_not_divide_v_is_refused(runs):
    ckpt = runs.done["w1"] / "ckpt"
    before = snapshot(ckpt)
    proc = runs.launch(5, ["--auto_resume", "--checkpoint_dir", str(ckpt),
                           "--log_dir", str(runs.base / "w5" / "log")])
    # torchrun exits 1 when a worker fails; its summary lists each rank's own exit code
    assert proc.returncode != 0
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) == {"2"}, proc.stderr[-3000:]
    errors = sorted(set(line for line in proc.stderr.splitlines()
                        if line.startswith("dcp_train: error:")))
    assert errors == ["dcp_train: error: --deterministic splits each step into 12 micro-batches "
                      "of --batch_size 2, which world size 5 does not divide; run on 1, 2, 3, "
                      "4, 6, 12 ranks, or change --batch_size"], proc.stderr[-2000:]
    assert snapshot(ckpt) == before


def test_switching_the_mode_on_resume_is_refused(runs):
    ckpt = runs.done["w1"] / "ckpt"
    before = snapshot(ckpt)
    args = [a for a in ARGS if a != "--deterministic"]
    proc = subprocess.run([sys.executable, "-m", "dcp_train.main", *args, "--data_dir",
                           str(runs.data), "--auto_resume", "--checkpoint_dir", str(ckpt),
                           "--log_dir", str(runs.base / "off" / "log")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("dcp_train: error: the checkpoint was written with --deterministic; resume it with "
            "the flag") in proc.stderr
    assert snapshot(ckpt) == before


def test_check_resume_and_micro_batch_count():
    on = parse_config(TINY + ["--batch_size", "2", "--total_batch_size", "768",
                              "--deterministic"])
    off = parse_config(TINY + ["--batch_size", "2", "--total_batch_size", "768"])
    assert micro_batches_per_step(on) == 12
    check_deterministic({"deterministic": True, "batch_size": 2}, on)
    check_deterministic({"batch_size": 2}, off)  # a checkpoint from before the flag existed
    with pytest.raises(ConfigError, match="written without --deterministic"):
        check_deterministic({"batch_size": 2}, on)
    with pytest.raises(ConfigError, match="keep that --batch_size"):
        check_deterministic({"deterministic": True, "batch_size": 4}, on)
    odd = parse_config(TINY + ["--batch_size", "5", "--total_batch_size", "768",
                               "--deterministic"])
    with pytest.raises(ConfigError, match="multiple of --batch_size 5"):
        micro_batches_per_step(odd)


@pytest.mark.parametrize("shape", [(4099,), (4099, 1)])  # 1-D: no weight decay; 2-D: decay
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_adamw_update_does_not_depend_on_shard_boundaries(device, shape):
    """The optimizer this mode steps on shards (dcp_train.optim: single-tensor AdamW on CPU,
    fused on CUDA) gives each element the same bits whether it is updated in one full tensor
    or in shards cut anywhere (vectorized body vs scalar tail, FMA)."""
    from dcp_train.optim import build_optimizer

    torch.set_num_threads(1)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(device) * 1e-2
             for s in range(2, 7)]

    def run(sections):
        params = [torch.nn.Parameter(c.clone()) for c in torch.tensor_split(full, sections)]
        holder = torch.nn.Module()
        holder.params = torch.nn.ParameterList(params)
        opt = build_optimizer(holder, 3e-3, 0.1, device)
        for g in grads:
            for p, gc in zip(params, torch.tensor_split(g, sections)):
                p.grad = gc.clone()
            opt.step()
        return [torch.cat(t) for t in ([p.detach() for p in params],
                                       [opt.state[p]["exp_avg"] for p in params],
                                       [opt.state[p]["exp_avg_sq"] for p in params])]

    ref = run(1)
    for sections in (2, 3, 4, 6, [7], [13, 1029, 2050]):
        for a, b in zip(ref, run(sections)):
            assert torch.equal(a, b), sections
