"""Small helpers shared by the benchmark parts: model sizes, statistics, child processes.

Nothing here is imported by dcp_train; the benchmark only imports from dcp_train.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:  # tests/procs.py and tests/servers.py (not a package)
    sys.path.append(str(REPO / "tests"))

from procs import child_env, descendants, free_port, torchrun  # noqa: E402,F401

from dcp_train.job.metrics import of_kind, read_metrics  # noqa: E402

# Model sizes used by the benchmark (nanoGPT GPTConfig names, as in dcp_train.config).
#  gpt2-124m : the real thing, 124M params; params + AdamW exp_avg + exp_avg_sq = 1.49 GB fp32
#  small     : 4 x 256 dims, block 256: 16M params, ~245 MB per checkpoint (an option)
#  tiny      : dcp_train's --preset tiny (2 x 64 dims, block 64): 3.3M params, ~40 MB
#  micro     : tiny with a 512-token vocab: 0.1M params, ~1.5 MB (--quick save/S3 sections;
#              too small a vocab for the GPT-2 token data, so not for training)
MODELS = {
    "gpt2-124m": dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    "small": dict(block_size=256, vocab_size=50304, n_layer=4, n_head=4, n_embd=256),
    "tiny": dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64),
    "micro": dict(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64),
}


def model_config(name: str):
    from dcp_train.config import ModelConfig
    return ModelConfig(**MODELS[name])


def model_flags(name: str) -> list[str]:
    """dcp_train.main flags for a bench model (on top of --preset tiny's run defaults)."""
    m = MODELS[name]
    return ["--preset", "tiny", *[x for k, v in m.items() for x in (f"--{k}", str(v))],
            "--seq_len", str(m["block_size"])]


def stats(values: list[float]) -> dict:
    """min / median / max (and the raw values) of a list of measurements."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def fmt_stats(r: dict) -> str:
    """`median (min-max)` of a stats() dict, 3 decimals; n/a without values."""
    return "n/a" if not r["n"] else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def ratios(num: list[float], den: list[float]) -> dict:
    """Per-repetition ratio num[i]/den[i] (paired: both measured in the same repetition)."""
    return stats([a / b for a, b in zip(num, den) if a is not None and b])


def threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


class ChildFailed(RuntimeError):
    pass


def run_child(cmd: list[str], nproc: int, timeout: float, env: dict | None = None,
              log=None) -> subprocess.CompletedProcess:
    """Run a child (torchrun or python) from the repo root; raise ChildFailed with its tail.
    On a timeout the child and every process under it are killed (torchrun starts its
    workers in sessions of their own, so its process group is not enough), then it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env, threads_per_rank(nproc)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something still holds the pipe: stop reading
            output = ""
        raise ChildFailed(failure_text(cmd, f"killed after its {timeout:.0f} s", output)) from None
    if log is not None:
        log(f"    ({time.perf_counter() - t0:.1f}s) {' '.join(cmd[-12:])[:160]}")
    if proc.returncode != 0:
        raise ChildFailed(failure_text(cmd, proc.returncode, output))
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def servers():
    """tests/servers.py: the moto S3 server and the GCS emulator on 127.0.0.1."""
    import servers as module
    return module


def failure_text(cmd: list[str], rc, output: str) -> str:
    """The command, the root cause (`dcp_train: error:` lines), the first rank's traceback
    (torchrun prints it among much else), the tail."""
    lines = output.splitlines()
    cause = [line for line in lines if "dcp_train: error:" in line][:3]
    first = next((line for line in lines if line.startswith("[rank")), None)
    tb = []
    if first is not None:
        prefix = first.split("]")[0] + "]"
        tb = [line for line in lines if line.startswith(prefix)][-40:]
    tail = lines[-25:]
    return "\n".join([f"exit {rc}: {' '.join(cmd)[:300]}", *cause, *tb, "--- tail:", *tail])


def run_records(run: Path, kind: str | None = None) -> list[dict]:
    """A run's metrics records (rank 0's `<run>/log/metrics.jsonl`), only `kind`'s if given."""
    recs = read_metrics(str(Path(run) / "log"))
    return recs if kind is None else of_kind(recs, kind)


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def drop_page_cache() -> bool:
    """sync + echo 3 > /proc/sys/vm/drop_caches. True if it worked (root, writable /proc)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def describe_model(name: str) -> dict:
    return {"name": name, **MODELS[name]}


def run_meta(started, load0: tuple, argv, **extra) -> dict:
    """What a results file says about its run: date, machine, command line, wall time, load."""
    import datetime
    import platform
    return {"date": started.isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "args": " ".join(argv if argv is not None else sys.argv[1:]), **extra,
            "wall_s": (datetime.datetime.now() - started).total_seconds(),
            "load": [" ".join(f"{x:.1f}" for x in load0),
                     " ".join(f"{x:.1f}" for x in os.getloadavg())]}


def write_results(out: str, meta: dict, results: list, text: str) -> None:
    """OUT.json (meta and every raw number) and OUT.md (the table); prints the table."""
    Path(out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    Path(out + ".md").write_text(text)
    print(text)


def cpu_seconds(pids=()) -> float:
    """User + system CPU-seconds so far of this process (all threads) and of `pids`."""
    total = sum(os.times()[:2])
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# ------------------------------------------- training segments (bench.run, bench.overlap)
def log(msg: str) -> None:
    print(msg, flush=True)


def segments(s) -> list[tuple[int, int]]:
    """Measured segments as (from step line, to step line). Segment j runs from the line of
    step k*j+1 to the line of step k*(j+1)+1: k steps and the save after step k*(j+1). The
    first save (step k) is a warm-up and the final step's save is after the last line."""
    k = s["interval"]
    return [(k * j + 1, k * (j + 1) + 1) for j in range(1, s["segments"] + 1)]


def seg_rates(marks: dict, s) -> tuple[list[float], list[float]]:
    """Per segment: tokens per wall second, tokens per CPU second."""
    wall, cpu = [], []
    for a, b in segments(s):
        tokens = (b - a) * s["train_total"]
        wall.append(tokens / (marks[b][0] - marks[a][0]))
        cpu.append(tokens / max(marks[b][1] - marks[a][1], 1e-9))
    return wall, cpu


def save_times(records: list[dict], s, field: str) -> list:
    """`field` of the checkpoint record of the save inside each measured segment."""
    ckpts: dict[int, dict] = {}
    for r in of_kind(records, "checkpoint"):
        ckpts.setdefault(r["step"], {}).update(r)
    return [ckpts.get(b - 1, {}).get(field) for _, b in segments(s)]

