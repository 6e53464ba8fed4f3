"""Goodput under a failure storm: how much of the paid wall time becomes training progress
(ETTR, effective training time ratio) while ranks die, nodes are lost, the bucket throttles or
goes silent, a rank hangs and the local disk fills.

    python -m bench.goodput --minutes 4 --seed 1 --json bench/results_goodput.json

In one run, on this machine (CPU, gloo, 2 ranks, --preset tiny, moto S3 behind
tests/fault_proxy.py, the local tier on a tmpfs of its own):

1. `ours`: the storm of bench/storm.py (seeded) over a job with two tiers (a local save every
   LOCAL_INTERVAL steps, the bucket every DURABLE_INTERVAL), supervised as bench/supervisor.py
   says, for --minutes of wall time (longer while the plan's last failure is not yet over),
   then stopped with SIGTERM (exit 75, a checkpoint).
2. `baseline`: the same storm and seed over the torchtitan-style job: synchronous saves to the
   bucket only, every DURABLE_INTERVAL steps.
3. `reference`: the failure-free run of ours' flags to ours' final step (--stop_at_step), for
   the failure-free median step time and for `final_equal` (model and optimizer tensors of the
   two final checkpoints, torch.equal).
4. `bare`: a bare launch, torchrun + `import torch` + a gloo process group
   (bench/bare_worker.py), measured before each run: the floor's cost of a relaunch (median).

ettr = final checkpoint's step x the reference's median step time / wall time (first launch
to the last exit); floor_ettr = 1 - (1 + k) x bare / wall, k = the failures that end a process (every other
failure costs the floor nothing). Per failure (bench/goodput_report.py): the steps lost and the
seconds from the failure to the next optimizer step, split into phases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import goodput_report as report
from bench.common import REPO, child_env, free_port, torchrun
from bench.storm import Injector, schedule
from bench.supervisor import POLL, RELAUNCH_CODES, Job

sys.path.insert(0, str(REPO / "tests"))
from fault_proxy import FaultProxy  # noqa: E402
from servers import start_s3_server  # noqa: E402
from helpers import committed_steps  # noqa: E402

LOCAL_INTERVAL = 5
DURABLE_INTERVAL = 25
STALL_TIMEOUT = 10.0
STORE_RETRY_BUDGET = 30.0
MAX_STEPS = 1_000_000  # never reached: the storm stops the job; the LR schedule is the same
TMPFS_SIZE = "400m"
MAX_OVERRUN = 3  # a storm whose failures are not all over by --minutes goes on, up to 3x
COMMON = ["--preset", "tiny", "--max_steps", str(MAX_STEPS), "--eval_interval", "0",
          "--hellaswag_interval", "0", "--generate_interval", "0",
          "--stall_timeout", str(STALL_TIMEOUT), "--store_retry_budget", str(STORE_RETRY_BUDGET),
          "--keep_last_n_checkpoints", "2", "--log_dir", "log"]


def flags(checkpoint_dir: str, local_dir: str | None) -> list[str]:
    """The trainer's flags: ours (two tiers) or the torchtitan-style baseline (bucket only)."""
    out = [*COMMON, "--checkpoint_dir", checkpoint_dir,
           "--checkpoint_interval", str(DURABLE_INTERVAL)]
    if local_dir:
        out += ["--local_checkpoint_dir", local_dir,
                "--local_checkpoint_interval", str(LOCAL_INTERVAL)]
    return out


def storm(name: str, work: Path, trainer_flags: list[str], env: dict, plan, proxy,
          local_dir: str | None, minutes: float, log) -> dict:
    """Run one supervised job through the storm; returns what was observed. It is stopped
    (SIGTERM: exit 75 with a checkpoint) once `minutes` have passed, every failure of the plan
    was injected, and the job trains again after the last one (at the latest at
    MAX_OVERRUN x `minutes`): each run gets the whole storm, and its wall time counts it."""
    workdir = work / name
    workdir.mkdir()
    job = Job(workdir, trainer_flags, env)
    inj = Injector(proxy, local_dir)
    pending = sorted(plan, key=lambda f: f.at)
    t0 = time.time()
    job.launch()
    stopping, end = False, None
    try:
        while end is None:
            now = time.time()
            ended = job.poll(now)
            inj.heal(now)
            if ended is not None:
                end = relaunch_or_end(job, ended, stopping, inj, plan, log)
                continue
            ready = not inj.busy(now) and training_since(job, recovery_start(plan, job))
            if not stopping and (now - t0 >= minutes * 60 * MAX_OVERRUN or (
                    now - t0 >= minutes * 60 and ready and not pending)):
                log(f"  [{name}] {now - t0:6.1f}s stop (SIGTERM)")
                job.stop()
                stopping = True
            elif not stopping and pending and now - t0 >= pending[0].at and ready:
                f = pending.pop(0)
                inj.inject(f, job, now)
                log(f"  [{name}] {now - t0:6.1f}s {f.kind}: {f.effect}")
            time.sleep(POLL)
    finally:
        inj.close()
        job.close()
    return {"name": name, "start": t0, "end": end, "wall_s": end - t0, "records": job.records,
            "launches": job.launches, "workers": job.workers, "failures": plan,
            "torchrun_log": str(workdir / "torchrun.log")}


def recovery_start(plan, job) -> float:
    """The time since which the job must have trained a step before the next failure: the
    end of the last failure injected (or the job's start)."""
    times = [f.injected + f.seconds for f in plan if f.injected is not None]
    return max(times) if times else job.launches[0]["start"]


def training_since(job: Job, since: float) -> bool:
    """Every rank's worker is alive and has trained a step since `since` (and since it started)."""
    alive = [w for w in job.workers.values() if w["gone"] is None and w["rank"] is not None]
    if len(alive) < job.nproc:
        return False
    since = max(since, *(w["start"] for w in alive))
    return any(r["kind"] == "train" and r["time"] > since for r in job.records)


def relaunch_or_end(job: Job, ended: dict, stopping: bool, inj: Injector, plan, log):
    """torchrun exited: relaunch (returning None) or the end time of the job."""
    node_lost = any(f.kind == "node_loss" and f.injected is not None and
                    f.injected >= ended["start"] for f in plan)
    codes = set(ended["codes"])
    if stopping:
        return ended["end"]
    if node_lost or codes & set(RELAUNCH_CODES):
        job.launch()
        return None
    if 2 in codes and inj.filler:  # the local tier's disk full: relaunch once it is freed
        full = [f for f in plan if f.kind == "disk_full" and f.injected is not None]
        max(full, key=lambda f: f.injected).info["exit_2_relaunched"] = True
        while inj.filler:
            time.sleep(POLL)
            inj.heal(time.time())
        job.launch()
        return None
    log(f"  job ended: torchrun rc {ended['rc']}, worker codes {sorted(codes)}\n{job.tail()}")
    return ended["end"]


def bare_relaunch(work: Path, i: int) -> dict:
    """One bare launch: torchrun + `import torch` + a gloo process group + a barrier, timed from
    the launch to the last rank's barrier (bench/bare_worker.py prints its times). Measured
    before each of the three runs, under the same load; the floor takes the median."""
    out = work / f"bare-{i}.json"
    cmd = torchrun(2, [str(REPO / "bench" / "bare_worker.py"), str(out)])
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    t0 = time.time()
    subprocess.run(cmd, cwd=work, env=child_env(2), check=True, capture_output=True, timeout=300)
    times = [json.loads(line) for line in out.read_text().splitlines()]
    ready = max(t["ready"] for t in times)
    return {"seconds": ready - t0, "ranks": times, "launch": t0}


def reference(work: Path, trainer_flags: list[str], env: dict, final_step: int) -> dict:
    """The failure-free run of the same flags to `final_step` (one launch, no storm)."""
    workdir = work / "reference"
    workdir.mkdir()
    job = Job(workdir, [*trainer_flags, "--stop_at_step", str(final_step)], env, max_restarts=0)
    t0 = time.time()
    job.launch()
    try:
        while (ended := job.poll(time.time())) is None:
            time.sleep(POLL)
        if ended["rc"] != 0:
            raise RuntimeError(f"the reference run failed (rc {ended['rc']}):\n{job.tail()}")
    finally:
        job.close()
    return {"name": "reference", "start": t0, "end": ended["end"], "records": job.records,
            "wall_s": ended["end"] - t0}


def latest_step(s3, prefix: str) -> int:
    """The step `latest` names in a bucket prefix (0: none), read past the proxy."""
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options)
    try:
        return int(fs.cat(f"{prefix}/latest").decode().strip().removeprefix("step_"))
    except FileNotFoundError:
        return 0


def mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                           str(path)], capture_output=True, text=True)
    return proc.returncode == 0


def run(minutes: float, seed: int, log) -> dict:
    plan_args = dict(seed=seed, minutes=minutes, stall_timeout=STALL_TIMEOUT)
    work = Path(tempfile.mkdtemp(prefix="goodput-"))
    s3 = start_s3_server()
    proxy = FaultProxy(s3.endpoint)
    local = work / "local"
    on_tmpfs = mount_tmpfs(local)
    try:
        bucket = s3.make_bucket("goodput")
        env = {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}
        bare = [bare_relaunch(work, 0)]
        log(f"bare relaunch {bare[0]['seconds']:.2f} s; tmpfs for the local tier: {on_tmpfs}")
        ours = storm("ours", work, flags(f"{bucket}/ours", str(local)), env,
                     schedule(**plan_args), proxy, str(local), minutes, log)
        bare.append(bare_relaunch(work, 1))
        base = storm("baseline", work, flags(f"{bucket}/baseline", None), env,
                     schedule(**plan_args), proxy, None, minutes, log)
        final = max(committed_steps(local), default=0)  # the stop's checkpoint
        bare.append(bare_relaunch(work, 2))
        log("bare relaunches (s): " + ", ".join(f"{b['seconds']:.2f}" for b in bare))
        ref = reference(work, flags(str(work / "reference-ckpt"), None), env, final)
        equal = report.final_equal(local / report.step_name(final),
                                   work / "reference-ckpt" / report.step_name(final), work)
        base["final_committed"] = latest_step(s3, "goodput/baseline")
        result = report.summarize(ours, base, ref, bare, equal, on_tmpfs)
    finally:
        proxy.close()
        s3.close()
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(local)], check=False)
    shutil.rmtree(work, ignore_errors=True)  # kept for a look when something failed
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="wall time of each storm")
    p.add_argument("--seed", type=int, default=1, help="seed of the failure schedule")
    p.add_argument("--json", default="", help="write the results here (and a .md beside it)")
    p.add_argument("--rerender", action="store_true",
                   help="no storm: recompute the load figures and the .md from --json's raw records")
    a = p.parse_args(argv)
    if a.rerender:
        result = json.loads(Path(a.json).read_text())
        report.load_figures(result)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        Path(a.json).with_suffix(".md").write_text(report.render(result, a.minutes, a.seed))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the clean-up below runs
    started, load0 = datetime.datetime.now(), os.getloadavg()  # the machine's clock is UTC
    log = lambda text: print(text, flush=True)  # noqa: E731
    result = run(a.minutes, a.seed, log)
    result["meta"] = report.meta(started, load0, argv if argv is not None else sys.argv[1:])
    report.load_figures(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    text = report.render(result, a.minutes, a.seed)
    print(text)
    if a.json:
        Path(a.json).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
