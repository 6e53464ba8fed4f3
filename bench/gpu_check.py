"""The GPU check, one command (launched by launch/gpu_check.sh; < 8 minutes on one H100/H200):

    bash launch/gpu_check.sh                         # CUDA, world size 1 (nccl + gloo)
    bash launch/gpu_check.sh --device cpu --tiny     # the same flow on CPU, tiny models

Parts, in this order (bench/gpu_parts.py says what each measures): env (torch, device, the
torch range check), speed (ours / plain build-nanogpt loop, MFU, async saves every 50 steps /
none, seconds blocked per save), exact (bit-exact resume and a --deterministic pair of runs),
pinned (the async save stages into pinned host memory), ckpt (save and resume GB/s against a
raw write and read of the same bytes; last: its duration on a GPU is the least known). Each part
runs in a time box and the whole run under a global deadline
(--deadline, seconds): a part that fails or runs out of time is recorded with its error and
the others go on; a part that would start with too little time left is recorded as skipped.

Writes --out (default bench/gpu_results.json; --tiny: bench/gpu_results_tiny.json, not kept
in git) and a table next to it (.md), and prints the table. Exit code 0 if every part ran and
its checks held, 1 if a part failed, ran out of time or missed a goal, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO
from bench.gpu_parts import EXACT_STEPS, EXACT_STOP, GOALS, PARTS, log

GPU = dict(speed_model="gpt2-124m", speed_batch=64, speed_total=65536, speed_steps=130, skip=10,
           save_interval=50, ckpt_model="gpt2-124m", ckpt_reps=1, exact_model="small",
           exact_batch=8, exact_total=4096, deadline=435,
           boxes=dict(env=30, speed=240, exact=150, pinned=40, ckpt=100))
TINY = dict(speed_model="micro", speed_batch=4, speed_total=512, speed_steps=12, skip=3,
            save_interval=4, ckpt_model="micro", ckpt_reps=1, exact_model="micro",
            exact_batch=4, exact_total=512, deadline=1500,
            boxes=dict(env=30, speed=600, ckpt=200, exact=600, pinned=200))
MIN_START = 20  # seconds: a part (or child) with less time left than this is not started


class Budget:
    """The time of one part: its box, capped by the run's global deadline."""

    def __init__(self, box_s: float, deadline: float):
        self.end = min(time.monotonic() + box_s, deadline)

    def left(self) -> float:
        """Seconds the next child may run; TimeoutError if too few are left to start one."""
        left = self.end - time.monotonic()
        if left < MIN_START:
            raise TimeoutError(f"{max(left, 0):.0f} s left of the part's time box or the "
                               "run's deadline: not started")
        return left


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(res: dict) -> str:
    """The figures as a markdown table (also printed)."""
    e, p = res["parts"].get("env", {}), res["parts"]
    rows = [f"GPU check {res['date']}: {e.get('device_name')} ({res['device']}), torch "
            f"{e.get('torch')}, CUDA {e.get('cuda')}, Python {e.get('python')}; "
            f"{'TINY CPU flow' if res['tiny'] else 'full'}; {res['elapsed_s']:.0f} s", "",
            "| part | figure | value | goal | met |", "|---|---|---|---|---|"]

    def add(part, what, value, goal="", met=None):
        rows.append(f"| {part} | {what} | {value} | {goal} | {'-' if met is None else met} |")

    z = p.get("speed", {})
    gm = z.get("goals_met", {})
    add("speed", f"tokens/s ours / plain loop, --compile, bf16 ({z.get('model', {}).get('name')}, "
        f"{z.get('batch')} x {z.get('model', {}).get('block_size')} tokens, steps "
        f"{z.get('skip')}..{z.get('steps')})",
        f"{_f(z.get('ours_tokens_per_s'), '.0f')} / {_f(z.get('plain_tokens_per_s'), '.0f')} = "
        f"{_f(z.get('ratio'))}", f">= {GOALS['ratio']}", gm.get("ratio"))
    add("speed", f"MFU ours / plain (peak {_f((z.get('peak_flops') or 0) / 1e12 or None, 'g')} "
        "TFLOP/s)", f"{_f(z.get('ours_mfu'))} / {_f(z.get('plain_mfu'))}",
        f">= {GOALS['mfu']}", gm.get("mfu"))
    add("speed", f"tokens/s async save every {res['settings']['save_interval']} steps / none",
        f"{_f(z.get('saves_tokens_per_s'), '.0f')} / {_f(z.get('ours_tokens_per_s'), '.0f')} = "
        f"{_f(z.get('save_ratio'))}", f">= {GOALS['save_ratio']}", gm.get("save_ratio"))
    saves = z.get("saves") or []
    add("speed", "per save: step, blocked s, staged s, until committed s",
        "; ".join(f"{r['step']}: {_f(r['blocked_s'])}, {_f(r['staged_s'])}, "
                  f"{_f(r['seconds'], '.2f')}" for r in saves) or "-",
        f"blocked < {GOALS['blocked_s']}", gm.get("blocked_s"))
    c = p.get("ckpt", {})
    add("ckpt", f"{c.get('model')} save GB/s: ours (CRC, manifest, fsync, rename) / raw write "
        f"(+fsync) = ratio; bare dcp.save ({_f((c.get('bytes') or 0) / 1e9 or None, '.2f')} GB)",
        f"{_f(c.get('save_gbps'), '.2f')} / {_f(c.get('raw_write_gbps'), '.2f')} = "
        f"{_f(c.get('save_vs_raw'), '.2f')}; {_f(c.get('dcp_save_gbps'), '.2f')}")
    add("ckpt", "resume GB/s: ours (verified) / raw read = ratio; unverified; bare dcp.load "
        f"(page cache dropped: {c.get('cache_dropped')})",
        f"{_f(c.get('resume_gbps'), '.2f')} / {_f(c.get('raw_read_gbps'), '.2f')} = "
        f"{_f(c.get('resume_vs_raw'), '.2f')}; {_f(c.get('resume_noverify_gbps'), '.2f')}; "
        f"{_f(c.get('dcp_load_gbps'), '.2f')}")
    x = p.get("exact", {})
    add("exact", f"stop at {EXACT_STOP}, resume, {EXACT_STEPS} steps (--deterministic --compile "
        "--async_checkpoint --dropout 0.1): losses ==, tensors differing, CUDA RNG saved",
        f"{x.get('losses_equal')}, {len(x.get('tensors_differing', []))} of "
        f"{x.get('tensors_compared')}, {x.get('cuda_rng_saved')}", "==, 0", x.get("resume_ok"))
    add("exact", "--deterministic pair of runs: losses ==", x.get("pair_losses_equal"), "==",
        x.get("pair_losses_equal"))
    y = p.get("pinned", {})
    add("pinned", "async save: staged tensors pinned / staged",
        f"{y.get('pinned')} / {y.get('staged_tensors')}", "all on CUDA", y.get("ok"))
    add("env", "torch in the supported range, private DCP parts present",
        e.get("torch_supported"), "", e.get("ok"))
    for part, err in res["errors"].items():
        lines = err.splitlines()
        cause = next((x for x in lines if "dcp_train: error:" in x), lines[0])
        rows.append(f"| {part} | FAILED | {cause[:300]} | | False |")
    return "\n".join(rows) + "\n"


def write(res: dict, target: Path, t0: float) -> str:
    """The results so far: JSON at `target`, the table beside it (.md); returns the table."""
    res["elapsed_s"] = time.perf_counter() - t0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(res, indent=1))
    md = table(res)
    target.with_suffix(".md").write_text(md)
    return md


def run_parts(a, s, work: Path, res: dict, target: Path) -> None:
    """Every part in its box under the global deadline; failures recorded, the rest go on;
    the results file rewritten after each part (a run killed from outside keeps them)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + (a.deadline or s["deadline"])
    for name in [x for x in a.parts.split(",") if x]:
        out = res["parts"].setdefault(name, {})
        t = time.perf_counter()
        try:
            budget = Budget(s["boxes"][name], deadline)
            budget.left()
            log(f"[{name}] ... ({budget.end - time.monotonic():.0f} s)")
            (work / name).mkdir()
            PARTS[name](a, s, work / name, out, budget)
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
            res["errors"][name] = f"{type(e).__name__}: {e}"[-4000:]
            out["ok"] = False
            log(f"[{name}] FAILED: {res['errors'][name][-2500:]}")
        out["part_seconds"] = round(time.perf_counter() - t, 1)
        log(f"[{name}] ok={out.get('ok')} in {out['part_seconds']} s")
        write(res, target, t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny models: the flow in minutes on CPU")
    ap.add_argument("--parts", default="env,speed,exact,pinned,ckpt",
                    help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="global deadline in seconds (0: 435 on GPU, 1500 with --tiny)")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="peak TFLOP/s of the device for MFU (0: by GPU name; none on CPU)")
    ap.add_argument("--out", default="", help="results JSON (default: bench/gpu_results.json; "
                    "with --tiny bench/gpu_results_tiny.json)")
    ap.add_argument("--workdir", default="", help="scratch dir (default: bench/.gpu-scratch)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available; run on a GPU machine, or with "
              "--device cpu --tiny for the CPU flow", file=sys.stderr, flush=True)
        return 2
    s = TINY if a.tiny else GPU
    work = Path(a.workdir or REPO / "bench" / ".gpu-scratch").resolve()
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": a.device, "tiny": a.tiny,
           "argv": sys.argv[1:] if argv is None else argv, "settings": s, "goals": GOALS,
           "parts": {}, "errors": {}}
    target = Path(a.out or REPO / "bench" / f"gpu_results{'_tiny' if a.tiny else ''}.json")
    run_parts(a, s, work, res, target)
    md = table(res)
    log("\n" + md + f"\nwrote {target} and {target.with_suffix('.md')}")
    subprocess.run(["rm", "-rf", str(work)])
    failed = res["errors"] or any(p.get("ok") is False for p in res["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
