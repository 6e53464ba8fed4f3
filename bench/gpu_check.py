"""The GPU check, one command (launched by launch/gpu_check.sh; docs/gpus.md#the-gpu-check):

    bash launch/gpu_check.sh              # CUDA, world size 1: the figures of the goals
    bash launch/gpu_check.sh --rehearse   # the same parts on CPU, tiny sizes, ~2 minutes

Parts, in this order: env (torch, device, allocator, the torch range check), speed, ckpt,
exact, pinned, deterministic (bench/gpu_parts.py and bench/gpu_exact.py say what each
measures). Each part, as it ends, prints one JSON line (`part`, `status`: ok / failed /
skipped, `reason` unless ok, `seconds`, its figures) and appends it to OUT/gpu_check.jsonl;
every child's output goes to OUT/logs/<part>.log. OUT is --out, else $OUT (what a device
command writes under $OUT comes back), else bench/gpu_out/ (not kept in git). At most 8
files come back from a device command: these are 7 (the jsonl, 6 logs).

Time: one clock for the whole check, started by launch/gpu_check.sh before anything is
imported ($GPU_CHECK_T0, Unix seconds; else this module's import). The check ends by
--deadline seconds on it (390 on a GPU, 285 in the rehearsal): each part runs in its time box,
capped by the deadline; a part that fails or runs out of time is recorded with its reason and
the next one goes on; a part that would start with too little time left is skipped. A SIGTERM
(the device command's outer `timeout`) kills the child in flight with its whole tree, writes
the part in progress (status failed, reason "stopped by SIGTERM", its figures so far) and the
rest as skipped, and exits 143.

Exit code 0 if no part failed (a skipped part is not a failure), 1 if one did, 2 without
CUDA (and without --rehearse).
"""

from __future__ import annotations

import os
import time

T0 = float(os.environ.get("GPU_CHECK_T0") or time.time())  # before the imports below

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import REPO  # noqa: E402
from bench.gpu_child import ALLOC_CONF, Children  # noqa: E402


GPU = dict(speed_model="gpt2-124m", speed_batches=[64, 32, 16], speed_total=65536,
           speed_steps=160, skip=10, save_interval=50, compile=True, ckpt_model="gpt2-124m",
           exact_model="small", exact_batch=8, exact_total=4096, matmul_n=8192, deadline=390,
           boxes=dict(env=30, speed=170, ckpt=110, exact=100, pinned=40, deterministic=45))
REHEARSE = dict(speed_model="micro", speed_batches=[4, 2], speed_total=512, speed_steps=12,
                skip=3, save_interval=4, compile=False, ckpt_model="micro",
                exact_model="micro", exact_batch=4, exact_total=512, matmul_n=256, deadline=285,
                boxes=dict(env=30, speed=100, ckpt=100, exact=120, pinned=60, deterministic=60))
MIN_START = 15  # seconds: a part (or child) with less time left than this is not started
ORDER = ["env", "speed", "ckpt", "exact", "pinned", "deterministic"]


class Stopped(BaseException):
    """Raised by the SIGTERM handler wherever the check is: it unwinds like Ctrl-C."""


class Budget:
    """The time of one part: its box, capped by the check's deadline (monotonic)."""

    def __init__(self, box_s: float, deadline: float):
        self.end = min(time.monotonic() + box_s, deadline)

    def left(self) -> float:
        """Seconds the next child may run; TimeoutError if too few are left to start one."""
        left = self.end - time.monotonic()
        if left < MIN_START:
            raise TimeoutError(f"{max(left, 0):.0f} s left of the part's time box or the "
                               "check's deadline: not started")
        return left


@dataclass
class Part:
    """What a part function gets: the command line, the settings, its scratch dir, the dict
    of its figures (written even if it fails), its time, the child runner (its log named
    after the part), and `shared`: what earlier parts left for later ones."""
    a: argparse.Namespace
    s: dict
    work: Path
    out: dict
    budget: Budget
    kids: Children
    shared: dict = field(default_factory=dict)

    def run(self, cmd: list[str], log: str = "") -> str:
        return self.kids.run(cmd, log or self.name, self.budget.left())

    @property
    def name(self) -> str:
        return self.work.name


class Report:
    """One JSON line per part: printed and appended to OUT/gpu_check.jsonl."""

    def __init__(self, out: Path):
        self.path = out / "gpu_check.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.failed = False

    def line(self, part: str, status: str, reason: str | None, seconds: float, figures: dict):
        rec = {"part": part, "status": status, **({"reason": reason} if reason else {}),
               "seconds": round(seconds, 1), **figures}
        text = json.dumps(rec, default=str)
        with open(self.path, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)
        self.failed |= status == "failed"


def run_parts(a, s, work: Path, report: Report, kids: Children, parts: list[str]) -> None:
    from bench.gpu_exact import PARTS as EXACT_PARTS
    from bench.gpu_parts import PARTS as SPEED_PARTS
    table = {**SPEED_PARTS, **EXACT_PARTS}
    deadline = time.monotonic() + (T0 + a.deadline - time.time())
    shared: dict = {}
    for i, name in enumerate(parts):
        t, out = time.perf_counter(), {}
        status, reason, started = "ok", None, False
        try:
            part = Part(a, s, work / name, out, Budget(s["boxes"][name], deadline), kids, shared)
            part.budget.left()
            started = True
            part.work.mkdir()
            table[name](part)
        except TimeoutError as e:
            status, reason = ("failed" if started else "skipped"), str(e)
        except Stopped:
            report.line(name, "failed", "stopped by SIGTERM", time.perf_counter() - t, out)
            for rest in parts[i + 1:]:
                report.line(rest, "skipped", "stopped by SIGTERM", 0.0, {})
            raise
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
            status, reason = "failed", f"{type(e).__name__}: {e}"[-3000:]
        report.line(name, status, reason, time.perf_counter() - t, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearse", action="store_true",
                    help="CPU, tiny sizes: every part's code path, in ~2 minutes")
    ap.add_argument("--parts", default=",".join(ORDER), help="comma list of " + ", ".join(ORDER))
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds on the check's clock (0: 390 on a GPU, 285 rehearsing)")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="datasheet peak TFLOP/s for MFU (0: by GPU name; none on CPU)")
    ap.add_argument("--out", default="", help="folder of gpu_check.jsonl and logs/ "
                    "(default: $OUT, else bench/gpu_out)")
    ap.add_argument("--workdir", default="", help="scratch dir (default: bench/.gpu-scratch)")
    a = ap.parse_args(argv)
    a.device = "cpu" if a.rehearse else "cuda"
    if not a.rehearse and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available; run on a GPU machine, or rehearse on "
              "CPU with --rehearse", file=sys.stderr, flush=True)
        return 2
    s = REHEARSE if a.rehearse else GPU
    a.deadline = a.deadline or s["deadline"]
    parts = [x for x in a.parts.split(",") if x]
    unknown = set(parts) - set(ORDER)
    if unknown:
        print(f"gpu_check: error: unknown part(s) {sorted(unknown)}; choose from {ORDER}",
              file=sys.stderr, flush=True)
        return 2
    out = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "gpu_out").resolve()
    work = Path(a.workdir or REPO / "bench" / ".gpu-scratch").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = Report(out)
    env = {"PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    if a.rehearse:  # a CPU shared with other work: one thread per child spins least
        env["OMP_NUM_THREADS"] = "1"
    kids = Children(out / "logs", env)

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    try:
        run_parts(a, s, work, report, kids, parts)
    except Stopped:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        kids.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
