"""Crash soak: SIGKILL a real 2-rank torchrun job at random times, resume, repeat; then check
that the finished run is bit-identical to an uninterrupted one.

    .venv/bin/python tests/soak.py                       # 20 kills, local checkpoint dir
    .venv/bin/python tests/soak.py --kills 50 --seed 7   # more, another schedule
    .venv/bin/python tests/soak.py --s3                  # checkpoints on a local moto S3 server
    .venv/bin/python tests/soak.py --metadata_flips 400  # no kills: what a flipped .metadata
                                                         # bit does with verification off

Each launch runs `--auto_resume`; once it has logged its first step, the script waits a random
0.5-2 s (seeded: the same --seed gives the same delays) and SIGKILLs torchrun and both ranks at
once. After every kill it checks the checkpoint dir: every committed step dir passes
manifest.problems (sizes and CRC-32) and `latest` names one of them. After the last kill one
more launch finishes the run: it stops (`--stop_at_step`, with a checkpoint) 2 steps past the
furthest step any launch reached; the LR schedule is that of a 10,000-step run, so no launch
ever reaches its end. Then the uninterrupted reference runs to the same step.

Passes when every loss logged by every launch equals the reference's loss at that step (==),
each launch resumed from the step `latest` named at the kill before it (with no fallback
note), and the final model/optimizer tensors are equal (torch.equal).

Not collected by pytest (no test_ prefix); tests/test_faults.py runs the same loop with 5 kills.
Exit code 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # helpers.py, servers.py; the dcp_train package

from helpers import (TINY, assert_same_tensors, kill_job, load_checkpoint, metrics,  # noqa: E402
                     of_kind, run_train, start_train, write_shards)

from dcp_train.checkpoint.io import manifest as M  # noqa: E402
from dcp_train.checkpoint.io.storage import Storage  # noqa: E402

# TINY, 2 ranks, a checkpoint every 3 steps (a save takes about as long as 1-3 steps, so many
# kills land in or next to one), keep 2. A launch makes ~5-15 steps a second on 2 cores.
CHECKPOINT_INTERVAL = 3
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--max_steps", "10000", "--checkpoint_interval", str(CHECKPOINT_INTERVAL),
        "--keep_last_n_checkpoints", "2"]
STEP_LINE = re.compile(r"^step +(\d+) \| loss")
SAVE_LINE = re.compile(r"^step +(\d+) \| checkpoint .* committed")
TMP_RE = re.compile(r"^step_(\d{8})\.tmp-")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------ checkpoint dir state
@dataclass
class DirState:
    latest: str | None  # what `latest` holds (stripped), None if missing
    committed: dict[str, list[str]]  # committed step dir -> manifest.problems (deep)
    partial: list[str]  # temp dirs and step dirs without manifest.json
    other: list[str]  # anything else but writer.lease (e.g. a `.latest.tmp-<id>` file)

    @property
    def latest_step(self) -> int | None:
        return int(self.latest[5:]) if self.latest else None

    def check(self) -> None:
        """The invariants a crash must never break."""
        bad = {n: p for n, p in self.committed.items() if p}
        assert not bad, f"committed checkpoints damaged: {bad}"
        if self.latest is not None:
            assert self.latest in self.committed, \
                f"`latest` names {self.latest!r}, committed: {sorted(self.committed)}"


def dir_state(st: Storage) -> DirState:
    names = st.listdir(st.root)
    committed, partial, other, latest = {}, [], [], None
    for name in names:
        if M.STEP_RE.match(name) and st.exists(st.join(name, M.MANIFEST)):
            committed[name] = M.problems(st, st.join(name))
        elif name.startswith("step_"):
            partial.append(name)
        elif name == "latest":
            latest = st.read_text(st.join(name)).strip()
        elif name != "writer.lease":
            other.append(name)
    return DirState(latest, committed, partial, other)


def fetch_step(st: Storage, name: str, tmp: Path) -> dict:
    """Step dir `name` of `st` as a flat dict of full tensors (downloaded first if remote)."""
    if st.is_local:
        return load_checkpoint(Path(st.join(name)), tmp)
    dest = tmp / f"{name}-{time.monotonic_ns()}"
    dest.mkdir(parents=True)
    st.fs.get(st.join(name).rstrip("/") + "/", str(dest) + "/", recursive=True)
    out = load_checkpoint(dest, tmp)
    shutil.rmtree(dest)
    return out


# ------------------------------------------------------------------------ the kill loop
@dataclass
class Kill:
    launch: int
    delay: float  # seconds after the launch logged its first step
    reached: int  # the last step rank 0 logged before the kill
    phase: str  # what the job was doing, from the console and the checkpoint dir
    latest: str | None  # `latest` right after the kill (the next launch must resume there)
    committed: list[str] = field(default_factory=list)


def _phase(state: DirState, last_line: str) -> str:
    """What the job was doing when it was killed, from rank 0's last console line (a step's
    line comes before its save, a save's `committed` line after retention) and the dir."""
    if m := SAVE_LINE.match(last_line):
        return f"training step {int(m.group(1)) + 1} (after a save)"
    if not (m := STEP_LINE.match(last_line)):
        return "starting"
    step = int(m.group(1))
    if step % CHECKPOINT_INTERVAL:
        return f"training step {step + 1}"
    name = step_name(step)  # this step's save was under way
    temps = [n for n in state.partial if n.startswith(name + ".tmp-")]
    if state.latest_step == step:
        return f"retention after committing {name}"
    if name in state.committed:
        if any(n.startswith(".latest.tmp") for n in state.other):
            return f"replacing `latest` with {name}"
        return f"between committing {name} and writing `latest`"
    if name in state.partial:  # object store: written in place, manifest not yet there
        return f"saving {name} (in place, no manifest yet)"
    if temps:
        return f"saving {name} (temp dir)"
    return f"saving {name} (before any of its files)"


class Console:
    """Collects a job's console lines on a thread (so the pipe never fills up)."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self.first_step = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if STEP_LINE.match(line):
                self.first_step.set()
        self.first_step.set()  # EOF: the job ended

    def reached(self) -> int:
        return max([int(m.group(1)) for l in self.lines if (m := STEP_LINE.match(l))], default=0)

    def join(self) -> None:
        self._thread.join(timeout=30)


@dataclass
class Soak:
    kills: list[Kill]
    final_step: int  # where the last launch stopped
    final_state: DirState


def run_with_kills(ckpt: str, log: Path, data: Path, kills: int, seed: int, *,
                   env: dict | None = None, storage_options: dict | None = None,
                   delays=(0.5, 2.0), say=print) -> Soak:
    """Launch, SIGKILL at a random time, check the dir, `kills` times; then one launch that
    stops 2 steps past the furthest step reached."""
    rng = random.Random(seed)
    st = Storage(ckpt, storage_options)
    launch_args = [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                   "--checkpoint_dir", ckpt, "--auto_resume"]
    done: list[Kill] = []
    for i in range(kills):
        delay = rng.uniform(*delays)
        proc = start_train(2, launch_args, env)
        console = Console(proc)
        try:
            if not console.first_step.wait(timeout=300):
                raise AssertionError(f"launch {i + 1}: no step within 300 s")
            time.sleep(delay)
        finally:
            ended = proc.poll() is not None
            kill_job(proc)
            console.join()
        if ended:
            raise AssertionError(f"launch {i + 1} ended by itself ({proc.returncode}):\n" +
                                 "\n".join(console.lines[-40:]))
        state = dir_state(st)
        state.check()
        last = console.lines[-1] if console.lines else ""
        kill = Kill(i + 1, delay, console.reached(), _phase(state, last), state.latest,
                    sorted(state.committed))
        done.append(kill)
        say(f"kill {i + 1:3d}: +{delay:.2f}s, step {kill.reached:4d} logged | {kill.phase:42s} | "
            f"latest {kill.latest} | committed {', '.join(kill.committed) or '-'}")
    final_step = max(k.reached for k in done) + 2
    run_train(2, [*launch_args, "--stop_at_step", str(final_step)], env=env)
    state = dir_state(st)
    state.check()
    say(f"last launch stopped at step {final_step}: latest {state.latest}, "
        f"committed {sorted(state.committed)}")
    return Soak(done, final_step, state)


def run_reference(data: Path, out: Path, final_step: int) -> dict[int, float]:
    log = out / "log"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                  "--checkpoint_dir", str(out / "ckpt"), "--stop_at_step", str(final_step)])
    return {r["step"]: r["loss"] for r in metrics(log, "train")}


def check_against(log: Path, soak: Soak, ref_losses: dict[int, float]) -> list[int]:
    """Every logged loss equals the reference's; each resume started where `latest` pointed
    at the kill before it, without a fallback. Returns the resume steps."""
    records = metrics(log)
    train = of_kind(records, "train")
    assert {r["step"] for r in train} == set(range(1, soak.final_step + 1))
    wrong = [(r["step"], r["loss"], ref_losses[r["step"]]) for r in train
             if r["loss"] != ref_losses[r["step"]]]
    assert not wrong, f"losses differ from the uninterrupted run (step, got, want): {wrong[:5]}"
    resumes = of_kind(records, "resume")
    assert all(not r["note"] for r in resumes), [r["note"] for r in resumes if r["note"]]
    expected = [k.latest for k in soak.kills if k.latest is not None]
    assert [Path(r["path"]).name for r in resumes] == expected
    assert [r["step"] for r in resumes] == [int(n[5:]) for n in expected]
    assert soak.final_state.latest == step_name(soak.final_step)
    return [r["step"] for r in resumes]


# ------------------------------------------------------------ .metadata bit-flip survey
def metadata_flip_survey(step_dir: Path, flips: int, seed: int) -> Counter:
    """What one flipped bit at a random offset of `.metadata` does when the manifest's CRC-32s
    are not checked (--verify_checkpoint false): every tensor of the checkpoint is loaded with
    dcp_train's reader (safe unpickler) in this process and compared with the intact load."""
    import logging
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from dcp_train.checkpoint.io.safe_metadata import load_metadata

    logging.disable(logging.CRITICAL)  # DCP logs every failed load with a traceback (root logger)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    good = (step_dir / ".metadata").read_bytes()
    entries = load_metadata(good, "intact").state_dict_metadata

    def load(path: Path) -> dict:
        sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()}
        dcp.load(sd, storage_reader=Storage(str(path)).dcp_reader(str(path)), no_dist=True)
        return sd

    intact, outcomes = load(step_dir), Counter()
    work = step_dir.with_name(step_dir.name + "-flips")
    shutil.copytree(step_dir, work)
    rng = random.Random(seed)
    for _ in range(flips):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (work / ".metadata").write_bytes(bytes(data))
        try:
            load_metadata(bytes(data), "flipped")
        except Exception:
            outcomes["refused by the safe unpickler (a one-line error at start)"] += 1
            continue
        try:
            loaded = load(work)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            root = e
            while getattr(root, "failures", None):  # DCP: {rank: (exception, traceback)}
                root = next(iter(root.failures.values()))[0]
            outcomes[f"unpickled, then DCP's load failed ({type(root).__name__})"] += 1
            continue
        same = all(torch.equal(intact[k], loaded[k]) for k in intact)
        outcomes["loaded, all tensors identical (bookkeeping bytes)" if same
                 else "LOADED SILENTLY WRONG"] += 1
    shutil.rmtree(work)
    return outcomes


# ------------------------------------------------------------------------------- script
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3", action="store_true", help="checkpoints on a local moto S3 server")
    p.add_argument("--min_delay", type=float, default=0.5)
    p.add_argument("--max_delay", type=float, default=2.0)
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--metadata_flips", type=int, default=0, metavar="N",
                   help="instead of kills: flip N random bits of a checkpoint's .metadata, one "
                        "at a time, and load it without CRC-32 verification")
    opts = p.parse_args()
    if opts.metadata_flips:
        return flip_main(opts)

    work = Path(tempfile.mkdtemp(prefix="dcp_train-soak-"))
    t0 = time.monotonic()
    server = None
    try:
        data = write_shards(work / "data")
        env, options, ckpt = None, None, str(work / "ckpt")
        if opts.s3:
            from servers import start_s3_server

            server = start_s3_server()
            server.make_bucket("soak")
            env, options, ckpt = server.env, server.storage_options, "s3://soak/run"
        print(f"soak: {opts.kills} kills, seed {opts.seed}, delays {opts.min_delay}-"
              f"{opts.max_delay}s after the first step, checkpoints in {ckpt}", flush=True)
        failures = []
        try:
            soak = run_with_kills(ckpt, work / "run" / "log", data, opts.kills, opts.seed,
                                  env=env, storage_options=options,
                                  delays=(opts.min_delay, opts.max_delay),
                                  say=lambda s: print(s, flush=True))
        except AssertionError as e:
            print(f"RESULT: FAIL\n  {e}")
            return 1
        ref_losses = run_reference(data, work / "ref", soak.final_step)
        try:
            resumes = check_against(work / "run" / "log", soak, ref_losses)
        except AssertionError as e:
            failures.append(f"run: {e}")
            resumes = []
        final = step_name(soak.final_step)
        try:
            assert_same_tensors(load_checkpoint(work / "ref" / "ckpt" / final, work),
                                fetch_step(Storage(ckpt, options), final, work))
        except AssertionError as e:
            failures.append(f"final tensors: {e}")

        phases = Counter(re.sub(r"step_\d+|step \d+", "step N", k.phase) for k in soak.kills)
        records = len(metrics(work / "run" / "log", "train"))
        print("\n===== soak summary =====")
        print(f"storage {'s3 (moto_server)' if opts.s3 else 'local'}; {len(soak.kills)} kills "
              f"(seed {opts.seed}), {len(soak.kills) + 1} launches, wall time "
              f"{time.monotonic() - t0:.0f}s")
        print(f"steps logged at the kills: {[k.reached for k in soak.kills]}")
        print("phases: " + "; ".join(f"{n} x{v}" for n, v in phases.most_common()))
        print(f"resumed from steps: {resumes}")
        print(f"last launch stopped at step {soak.final_step}; {records} train records of all "
              f"launches compared with == against the reference; final tensors with torch.equal")
        print("RESULT: " + ("PASS (bit-identical to the uninterrupted run)" if not failures
                            else "FAIL\n  " + "\n  ".join(failures)))
        return 0 if not failures else 1
    finally:
        if server is not None:
            server.close()
        if opts.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def flip_main(opts) -> int:
    work = Path(tempfile.mkdtemp(prefix="dcp_train-flips-"))
    try:
        data = write_shards(work / "data")
        run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(work / "log"),
                      "--checkpoint_dir", str(work / "ckpt"), "--stop_at_step", "3"])
        outcomes = metadata_flip_survey(work / "ckpt" / step_name(3), opts.metadata_flips,
                                        opts.seed)
        print(f"\n===== {opts.metadata_flips} single-bit flips of .metadata (seed {opts.seed}), "
              "loaded without CRC-32 verification =====")
        for outcome, n in outcomes.most_common():
            print(f"{n:5d}  {outcome}")
        silent = outcomes["LOADED SILENTLY WRONG"]
        print(f"silently wrong loads: {silent} of {opts.metadata_flips} (with verification on, "
              "the manifest's CRC-32 catches every one of these flips)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
