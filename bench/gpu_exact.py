"""The GPU check's exact, pinned and deterministic parts (bench/gpu_check.py runs them; the
conventions of bench/gpu_parts.py hold here too).

  exact          --deterministic --dropout 0.1 --async_checkpoint, world size 1, a small GPT:
                 `ref` runs EXACT_STEPS steps
                 (saves at steps 4 and 8); `resumed` starts from a copy of ref's step 4 with
                 --auto_resume (one launch fewer than stopping a run; stopping with
                 --stop_at_step and resuming is tested in tests/test_async.py). Bit-exact resume: losses of steps 5-8 ==,
                 and the final model, AdamW state and RNG states (torch CPU, the CUDA
                 device's, numpy, Python) torch.equal / ==.
                 The comparison is written as soon as those runs end. Compiled: no, and the
                 figures say so (`compiled`): --deterministic trains through
                 DeterministicStep's replica, an uncompiled GPT (dcp_train/train/
                 deterministic.py), so --compile would change nothing in its steps; the
                 compiled path's resume is checked bit for bit on CPU (tests/test_compile.py).
  pinned         an async Checkpointer.save stages into pinned host memory (bench.gpu_probe):
                 on CUDA, every staged tensor whose storage DCP's stager is willing to pin
                 (at least its `pin_memory_min_bytes`, read from the torch installed: 5 bytes
                 in 2.13, so AdamW's 4-byte `step` scalars are copied unpinned) is pinned; on
                 CPU none is (plain memory is what the stager uses there).
  deterministic  a second uninterrupted `ref` run (`ref2`): losses == and the final state
                 torch.equal to exact's `ref` (both ran here, now); if exact did not leave a
                 `ref`, this part runs both.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from bench.common import model_flags, read_json, run_records
from bench.gpu_child import CheckFailed
from bench.gpu_parts import quiet_flags, trainer, write_tokens
from dcp_train.tools.export import load_full_state

from helpers import losses  # noqa: E402 (tests/, on the path through bench.common)

EXACT_STEPS, RESUME_AT = 8, 4
UNCOMPILED = ("--deterministic trains through DeterministicStep's uncompiled replica, so "
              "these runs are eager; the compiled resume is checked on CPU (test_compile.py)")


def exact_run(p, name: str, extra: list[str] = ()) -> Path:
    s, run = p.s, p.work / name
    data = p.shared.get("exact_data")
    if data is None:
        data = p.shared["exact_data"] = write_tokens(p.work / "data", 400_000, 512)
    p.run(trainer(model_flags(s["exact_model"]) + [
        "--deterministic", "--dropout", "0.1", "--batch_size", str(s["exact_batch"]),
        "--total_batch_size", str(s["exact_total"]), "--max_steps", str(EXACT_STEPS),
        "--warmup_steps", "2", "--checkpoint_interval", "4", "--async_checkpoint",
        "--compile", "false", *quiet_flags(p.a.device, data, run), *extra]))
    return run


def compare(ref: Path, other: Path, tmp: Path) -> dict:
    """Losses (of the steps `other` ran) and final state of two runs: what differs (empty
    lists: bit for bit equal)."""
    final = f"step_{EXACT_STEPS:08d}"
    a = load_full_state(ref / "ckpt" / final, tmp)
    b = load_full_state(other / "ckpt" / final, tmp)
    keys = sorted(k for k in a if k.startswith(("model.", "optim.", "rank_00000.torch_cpu",
                                                "rank_00000.cuda")))
    plain = [json.loads(bytes(sd["rank_00000.json"].tolist()))["rng"] for sd in (a, b)]
    la, lb = losses(ref / "log"), losses(other / "log")
    return {"steps": sorted(lb), "losses_equal": lb == {k: la.get(k) for k in lb}
            and max(lb) == len(la) == EXACT_STEPS,
            "tensors_compared": len(keys),
            "tensors_differing": [k for k in keys if k not in b or not torch.equal(a[k], b[k])],
            "rng_numpy_python_equal": plain[0] == plain[1],
            "cuda_rng_saved": "rank_00000.cuda" in a}


def part_exact(p) -> None:
    out = p.out
    out.update(compiled=False, compiled_why=UNCOMPILED, resume_from=RESUME_AT)
    ref = p.shared["ref"] = exact_run(p, "ref")
    resumed, step = p.work / "resumed", f"step_{RESUME_AT:08d}"
    shutil.copytree(ref / "ckpt" / step, resumed / "ckpt" / step)
    (resumed / "ckpt" / "latest").write_text(step + "\n")
    exact_run(p, "resumed", ["--auto_resume"])
    recs = run_records(resumed)
    out.update(compare(ref, resumed, p.work),
               resumed_at=[r["step"] for r in recs if r["kind"] == "resume"],
               async_saves=all(r.get("async") for r in recs if r["kind"] == "checkpoint"))
    bad = [k for k, good in [
        ("losses", out["losses_equal"]), ("tensors", not out["tensors_differing"]),
        ("numpy/python RNG", out["rng_numpy_python_equal"]),
        ("resumed at", out["resumed_at"] == [RESUME_AT]), ("async saves", out["async_saves"]),
        ("CUDA RNG saved", p.a.device != "cuda" or out["cuda_rng_saved"])] if not good]
    if bad:
        raise CheckFailed(f"the resumed run differs from the uninterrupted one: {bad}")


def part_deterministic(p) -> None:
    ref = p.shared.get("ref")
    p.out.update(compiled=False, compiled_why=UNCOMPILED, ref_from="exact" if ref else "here")
    if ref is None or not (ref / "ckpt" / f"step_{EXACT_STEPS:08d}").is_dir():
        ref = exact_run(p, "ref")
    p.out.update(compare(ref, exact_run(p, "ref2"), p.work))
    if not p.out["losses_equal"] or p.out["tensors_differing"]:
        raise CheckFailed("two --deterministic runs of the same flags differ")


def part_pinned(p) -> None:
    target = p.work / "probe.json"
    p.run([sys.executable, "-m", "bench.gpu_probe", "--root", str(p.work / "probe"), "--out",
           str(target), "--device", p.a.device])
    out = p.out
    out.update(read_json(target))
    expect = out["eligible"] if p.a.device == "cuda" else 0
    out["expected_pinned"] = expect
    if not (out["committed"] and out["staged_tensors"] > 0 and out["pinned"] == expect
            and out["on_cpu"] == out["staged_tensors"]):
        raise CheckFailed(f"{out['pinned']} staged tensors pinned, expected {expect} "
                          f"(of {out['staged_tensors']} staged, {out['on_cpu']} on the CPU)")


PARTS = {"exact": part_exact, "pinned": part_pinned, "deterministic": part_deterministic}
