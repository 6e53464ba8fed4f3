"""Resuming on another world size: same token stream, exact state, recomputed accumulation.

Real `torchrun` jobs on CPU/gloo. One uninterrupted 2-rank run of 12 steps (checkpoints at 4,
8, 12) is the reference for every test (module fixture). Its step-4 checkpoint is "saved at
world size 2"; the other runs resume from it, or from each other:

    ref   W=2  steps 1..12                      (saves 4, 8, 12)
    w1    W=1  ref/step_4 -> steps 5..12
    w3    W=3  ref/step_4 -> steps 5..12
    w4    W=4  ref/step_4 -> steps 5..8         (saves 8: the "saved at 4" of the chain)
    leg2  W=2  w4/step_8  -> steps 9..10, --num_workers 2
    leg3  W=3  auto_resume leg2's dir -> steps 11..12, --num_workers 0
    reshard W in (1, 3, 4): ref/step_4 -> step 4 saved at W into a new dir, no training

The data has N = 100 samples and a step reads 24 (--total_batch_size 768 / --seq_len 32), so
epoch boundaries fall inside steps 5 and 9: right after a world-size change.

Loss tolerance. At every step the global batch is the same set of samples at every world
size, but the fp32 sums that make the loss and the gradients run in another order: a rank
accumulates 24/(2W) micro-batch gradients (instead of 6), the gradient reduce-scatter and the
loss all-reduce add W partial sums (instead of 2), and each rank's micro-batches hold other
samples. Float addition is not associative, so results differ in the last bits, and the tiny
parameter differences carry into later steps. Measured here (steps 5..12, losses 4.7..5.5):
max |diff| 4.8e-7 (W=1, 3; exactly 0 at W=4), max relative diff 1.0e-7; one fp32 ulp at
4..8 is 4.8e-7. (A variant with 8 steps and 1248 samples gave at most 9.5e-7, rel 1.9e-7.) The
tolerance, LOSS_REL_TOL = 2e-6 relative (~1e-5 absolute, about 20 ulps), is well above that
reduction-order noise and far below any real divergence (the loss moves by 0.03..0.2 from one
step to the next here; another batch or another optimizer state shows up at that scale).

Run: .venv/bin/python -m pytest tests/test_world_size.py -q -x
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcp_train.data import TokenShards, find_shards, global_batch
from dcp_train.data.sampler import global_permutation, stream_samples
from tests.helpers import (TINY, assert_same_tensors, digests, load_checkpoint, losses, metrics,
                           run_train, snapshot, step_dir, write_shards)

SEQ = 32
TOTAL_BATCH = 768  # tokens per step: 24 samples; 24 / (W * micro 2) is whole for W = 1, 2, 3, 4
SAMPLES_PER_STEP = TOTAL_BATCH // SEQ
MAX_STEPS = 12
SEED = 1234
N_SAMPLES = 100  # two shards of 50 samples each (50*32 + 1 tokens)
LOSS_REL_TOL = 2e-6  # see the module docstring
SEEDED = "seeded(seed, step, rank)"

ARGS = TINY + ["--dropout", "0", "--total_batch_size", str(TOTAL_BATCH), "--batch_size", "2",
               "--max_steps", str(MAX_STEPS), "--checkpoint_interval", "4", "--seed", str(SEED)]


def batch_digest(ids) -> str:
    """The `batch_digest` of a train record, computed as train/loop.py does."""
    return hashlib.sha256(repr(sorted(int(i) for i in ids)).encode()).hexdigest()[:16]


@dataclass
class Run:
    log: Path
    ckpt: Path
    stdout: str


class Runs:
    """The reference run and the resumed runs, each launched once per module."""

    def __init__(self, base: Path):
        self.base = base
        self.data = write_shards(base / "data", n_train_tokens=2 * (50 * SEQ + 1))
        self.cache: dict[str, Run] = {}

    def run(self, name: str, nproc: int, extra: list[str], ckpt: Path | None = None) -> Run:
        if name not in self.cache:
            log, ckpt = self.base / name / "log", ckpt or self.base / name / "ckpt"
            proc = run_train(nproc, ARGS + ["--data_dir", str(self.data), "--log_dir", str(log),
                                            "--checkpoint_dir", str(ckpt), *extra])
            self.cache[name] = Run(log, ckpt, proc.stdout)
        return self.cache[name]

    @property
    def ref(self) -> Run:
        return self.run("ref", 2, [])

    def resumed(self, world: int) -> Run:
        """W ranks resume from the reference's step-4 checkpoint (saved at world size 2)."""
        stop = ["--stop_at_step", "8"] if world == 4 else []  # w4 feeds the chain at step 8
        return self.run(f"w{world}", world, ["--resume", "--checkpoint_path",
                                             str(step_dir(self.ref.ckpt, 4)), *stop])

    def reshard(self, world: int) -> Run:
        """Load ref/step_4 at W ranks and save it, with no training, into a new dir."""
        return self.run(f"reshard{world}", world, ["--resume", "--checkpoint_path",
                                                   str(step_dir(self.ref.ckpt, 4)),
                                                   "--stop_at_step", "4"])

    def chain(self) -> tuple[Run, Run, Run]:
        """2 -> 4 -> 2 -> 3: w4 (steps 5..8), leg2 (9..10, 2 workers), leg3 (11..12)."""
        w4 = self.resumed(4)
        leg2 = self.run("leg2", 2, ["--resume", "--checkpoint_path", str(step_dir(w4.ckpt, 8)),
                                    "--stop_at_step", "10", "--num_workers", "2"])
        leg3 = self.run("leg3", 3, ["--auto_resume"], ckpt=leg2.ckpt)  # via leg2's `latest`
        return w4, leg2, leg3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("world_size"))


def max_loss_diff(ref: dict[int, float], got: dict[int, float]) -> tuple[float, float]:
    abs_diff = max(abs(got[s] - ref[s]) for s in got)
    return abs_diff, max(abs(got[s] - ref[s]) / abs(ref[s]) for s in got)


def assert_follows_reference(runs: Runs, run: Run, steps: range) -> None:
    """Same global batch as the uninterrupted run at every step, losses within tolerance."""
    ref_digests, ref_losses = digests(runs.ref.log), losses(runs.ref.log)
    got_digests, got_losses = digests(run.log), losses(run.log)
    assert sorted(got_digests) == list(steps)
    assert got_digests == {s: ref_digests[s] for s in steps}
    for s in steps:
        assert math.isclose(got_losses[s], ref_losses[s], rel_tol=LOSS_REL_TOL, abs_tol=0), \
            (s, got_losses[s], ref_losses[s])
    abs_diff, rel_diff = max_loss_diff(ref_losses, got_losses)
    print(f"\n{run.log.parent.name}: max |loss diff| {abs_diff:.3g}, max rel {rel_diff:.3g}")


def assert_resume_record(run: Run, step: int, saved: int, world: int, path: Path) -> None:
    [record] = metrics(run.log, "resume")
    assert record["step"] == step
    assert record["world_size_saved"] == saved and record["world_size"] == world
    assert record["rng"] == (SEEDED if saved != world else "restored")
    assert Path(record["path"]) == path


# ---- 1. save at 2, resume at 1, 3, 4 -------------------------------------------------------

@pytest.mark.parametrize("world", [1, 3, 4])
def test_resume_saved_at_2_on_another_world_size(runs, world, tmp_path):
    run = runs.resumed(world)
    last = 8 if world == 4 else MAX_STEPS
    assert_follows_reference(runs, run, range(5, last + 1))
    assert_resume_record(run, 4, 2, world, step_dir(runs.ref.ckpt, 4))
    accum = SAMPLES_PER_STEP // (world * 2)
    assert f"world {world}, grad accum {accum}," in run.stdout

    # model and optimizer right after loading at W == the saved ones, bit for bit
    resharded = runs.reshard(world)
    assert_resume_record(resharded, 4, 2, world, step_dir(runs.ref.ckpt, 4))
    assert digests(resharded.log) == {}  # no step was run
    assert sorted(p.name for p in resharded.ckpt.glob("step_*")) == ["step_00000004"]
    saved = load_checkpoint(step_dir(runs.ref.ckpt, 4), tmp_path)
    loaded = load_checkpoint(step_dir(resharded.ckpt, 4), tmp_path)
    assert_same_tensors(saved, loaded)
    # ... and the new checkpoint holds one RNG/loader entry per new rank
    assert {k.split(".")[0] for k in loaded if k.startswith("rank_")} == \
        {f"rank_{r:05d}" for r in range(world)}


# ---- 2. save at 4, resume at 2, then 3: no duplicate, no gap --------------------------------

def test_chain_4_to_2_to_3_reads_the_stream_once(runs):
    w4, leg2, leg3 = runs.chain()
    assert_follows_reference(runs, leg2, range(9, 11))
    assert_follows_reference(runs, leg3, range(11, 13))
    assert_resume_record(leg2, 8, 4, 2, step_dir(w4.ckpt, 8))
    assert_resume_record(leg3, 10, 2, 3, step_dir(leg2.ckpt, 10))

    # the whole run: steps 1..4 at W=2 (ref), 5..8 at W=4, 9..10 at W=2, 11..12 at W=3
    consumed = {**{s: d for s, d in digests(runs.ref.log).items() if s <= 4},
                **digests(w4.log), **digests(leg2.log), **digests(leg3.log)}
    assert sorted(consumed) == list(range(1, MAX_STEPS + 1))

    # what each step must have read, from the data-order contract alone
    n = len(TokenShards(find_shards(str(runs.data), "train"), SEQ))
    assert n == N_SAMPLES
    expected = {s: global_batch(n, SEED, SAMPLES_PER_STEP, s) for s in consumed}
    assert consumed == {s: batch_digest(ids) for s, ids in expected.items()}

    # ... and those steps, end to end, are the stream: every epoch once, nothing twice, no gap
    stream = [int(i) for s in sorted(expected) for i in expected[s]]
    total = MAX_STEPS * SAMPLES_PER_STEP
    assert stream == stream_samples(n, SEED, 0, total).tolist()
    for e in range(total // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
        assert stream[e * n:(e + 1) * n] == global_permutation(n, SEED, e).tolist()
    assert len(set(stream[(total // n) * n:])) == total % n  # the partial last epoch


# ---- 3. data loader workers across a world-size change --------------------------------------

def test_num_workers_across_world_size_change(runs):
    w4, leg2, leg3 = runs.chain()
    # leg2: saved at W=4 with 0 workers, resumed at W=2 with 2 workers; leg3: the reverse, 2->3
    worlds = lambda log: [(r["world_size_saved"], r["world_size"])  # noqa: E731
                          for r in metrics(log, "resume")]
    assert worlds(leg2.log) == [(4, 2)] and worlds(leg3.log) == [(2, 3)]
    assert digests(leg2.log) == {s: digests(runs.ref.log)[s] for s in (9, 10)}
    assert digests(leg3.log) == {s: digests(runs.ref.log)[s] for s in (11, 12)}


# ---- 4. accumulation recomputed; an impossible combination fails before loading -------------

def test_world_size_that_cannot_keep_the_global_batch(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs.ref.ckpt, ckpt)
    before = snapshot(ckpt)
    log = tmp_path / "log"
    # 3 ranks x micro-batch 3 x 32 tokens = 288 does not divide the 768-token global batch
    proc = run_train(3, ARGS + ["--batch_size", "3", "--data_dir", str(runs.data),
                                "--log_dir", str(log), "--checkpoint_dir", str(ckpt),
                                "--auto_resume"], check=False)
    assert proc.returncode != 0
    # every rank prints the same one-line error (their lines may interleave on the shared pipe)
    error = ("dcp_train: error: --total_batch_size 768 is not divisible by batch_size*seq_len*"
             "world_size = 3*32*3 = 288; change --batch_size or --total_batch_size")
    assert error in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout and "params" not in proc.stdout  # nothing loaded
    assert metrics(log, "resume") == []
    assert snapshot(ckpt) == before


# ---- 5. the resume record ------------------------------------------------------------------

def test_resume_records_name_both_world_sizes_and_the_rng_policy(runs):
    w4, leg2, leg3 = runs.chain()
    resumed = [(runs.resumed(1), 2, 1), (runs.resumed(3), 2, 3), (w4, 2, 4), (leg2, 4, 2),
               (leg3, 2, 3)]
    for run, saved, world in resumed:
        [record] = metrics(run.log, "resume")
        assert {"step", "path", "world_size_saved", "world_size", "rng"} <= set(record)
        assert (record["world_size_saved"], record["world_size"]) == (saved, world)
        assert record["rng"] == SEEDED  # no rank reads a saved rank's RNG on a world change
        assert f"(world size {saved} -> {world}, rng {SEEDED})" in run.stdout
