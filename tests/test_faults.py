"""Crash safety: real torchrun jobs SIGKILLed at every point of the save protocol (local and on
an S3 server), at random times, preempted with SIGTERM/SIGUSR1; flipped bytes in every kind of
checkpoint file; a malicious `.metadata`; bad inputs; two runs on one checkpoint dir.

Every comparison with the uninterrupted reference run is exact: losses with ==, tensors with
torch.equal. TINY model, 2 ranks, 6 steps, a checkpoint every 2 steps, keep 1, dropout 0.1.

    1. fault points   DCP_TRAIN_FAULT=POINT:RANK:4 kills that rank inside the save of step 4
                      (5 points x local/S3); then --auto_resume finishes the run
    2. random kills   5 SIGKILLs of the whole job at seeded random times (tests/soak.py: >= 20)
    3. flipped bytes  shard, .metadata, manifest.json, latest: detected, loud fallback
    4. safe loading   a .metadata whose pickle runs os.system is refused; no byte entries
    5. preemption     SIGTERM to torchrun, SIGUSR1 to the ranks: checkpoint at step N, exit 75
    6. bad input      one `dcp_train: error:` line for the job, exit != 0, the dir untouched
    7. writer lease   a second run on a live run's dir is refused; after a SIGKILL it takes over

Run: .venv/bin/python -m pytest tests/test_faults.py -q
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (REPO, TINY, assert_same_tensors, child_env, descendants, exit_codes, kill_job,
                     load_checkpoint, losses, metrics, one_error, run_train, snapshot, start_train,
                     wait_job)
from soak import (TMP_RE, Console, check_against, dir_state, fetch_step, run_reference,
                  run_with_kills)

from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.safe_metadata import UnsafeCheckpointError, load_metadata
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.io.names import step_name
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.restore import share as _share
from dcp_train.errors import CheckpointError
from dcp_train.job.faults import POINTS

N = 6
FAULT_STEP = 4
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--max_steps", str(N), "--checkpoint_interval", "2", "--keep_last_n_checkpoints", "1"]
KEEP_ALL = ["--keep_last_n_checkpoints", "-1"]


# ------------------------------------------------------------------------------ fixtures
@dataclass
class Ref:
    losses: dict[int, float]
    final: dict  # flat tensors of step N


@pytest.fixture(scope="module")
def reference(base, data) -> Ref:
    """The uninterrupted run every other run is compared with (local and S3 alike: where the
    checkpoints are stored must not change a single bit)."""
    out = base / "ref"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(out / "log"),
                  "--checkpoint_dir", str(out / "ckpt")])
    return Ref(losses(out / "log"), load_checkpoint(out / "ckpt" / step_name(N), base))


@pytest.fixture(scope="module")
def stopped(base, data) -> Path:
    """A checkpoint dir with committed step 2 and step 4, `latest` = step 4 (not to be modified:
    tests copy it)."""
    out = base / "stopped"
    run_train(2, [*ARGS, *KEEP_ALL, "--stop_at_step", "4", "--data_dir", str(data),
                  "--log_dir", str(out / "log"), "--checkpoint_dir", str(out / "ckpt")])
    assert sorted(os.listdir(out / "ckpt")) == ["latest", step_name(2), step_name(4)]
    return out / "ckpt"


# ------------------------------------------------------------------------------- helpers
def assert_same_as_reference(log: Path, ref: Ref, first_step: int = 1) -> None:
    """Every train record of every launch has the reference's loss at that step (==)."""
    train = metrics(log, "train")
    assert {r["step"] for r in train} == set(range(first_step, N + 1))
    wrong = [(r["step"], r["loss"], ref.losses[r["step"]]) for r in train
             if r["loss"] != ref.losses[r["step"]]]
    assert not wrong, wrong


def plain(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """One process without torchrun (world size 1): enough for checks before any training."""
    return subprocess.run([sys.executable, "-m", "dcp_train.main", *args], cwd=REPO,
                          env=child_env(env), capture_output=True, text=True, timeout=180)


def flip(path: Path, offset: int | None = None, bit: int = 0) -> int:
    """Flip one bit of one byte (default: the middle byte); returns the offset."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return offset


def copy_stopped(stopped: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped, ckpt)
    return ckpt


# ========================================================= 1. SIGKILL at every fault point
FAULTS = {  # point: (rank that dies, `latest` after the kill, committed dirs after the kill)
    "mid_shard": (1, 2, [2]),  # rank 1 has written part of a file (object store: maybe none)
    "after_shards": (1, 2, [2]),  # rank 1's shard written, no manifest: a temp dir (local),
    # the step dir itself (object store)
    "before_commit": (0, 2, [2]),  # local: a complete temp dir with manifest.json, not
    # renamed; object store: every file in the step dir but manifest.json
    "after_commit": (0, 2, [2, 4]),  # step 4 committed, `latest` still names step 2
    "mid_latest": (0, 2, [2, 4]),  # `latest`'s temp file written (local), not in place
    "during_retention": (0, 4, [4]),  # `latest` = step 4, step 2 deleted (keep 1)
    "mid_removal": (0, 4, [4]),  # step 2 lost its manifest first: no longer committed
}
assert set(FAULTS) == set(POINTS)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_fault_point_then_auto_resume_is_bit_exact(point, where, request, data,
                                                              reference, tmp_path):
    rank, latest_step, committed = FAULTS[point]
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        ckpt, env, options = f"s3://ckpt/{point}", s3.env, s3.storage_options
    else:
        ckpt, env, options = str(tmp_path / "ckpt"), {}, None
    st, log = Storage(ckpt, options), tmp_path / "log"
    args = [*ARGS, "--data_dir", str(data), "--log_dir", str(log), "--checkpoint_dir", ckpt]

    killed = run_train(2, args, env={**env, "DCP_TRAIN_FAULT": f"{point}:{rank}:{FAULT_STEP}"},
                       check=False)
    assert killed.returncode != 0
    assert exit_codes(killed).get(rank) == -9, killed.stderr[-3000:]  # that rank: SIGKILL
    assert max(losses(log)) == FAULT_STEP  # it died inside the save of step 4

    after = dir_state(st)
    after.check()  # every committed dir intact, `latest` names one of them
    assert after.latest == step_name(latest_step)
    assert sorted(after.committed) == [step_name(s) for s in committed]
    if point in ("mid_shard", "after_shards", "before_commit") and where == "local":
        [tmp] = after.partial
        assert TMP_RE.match(tmp) and tmp.startswith(step_name(FAULT_STEP))
        files = st.listdir(st.join(tmp))
        assert point == "mid_shard" or "__1_0.distcp" in files
        assert (M.MANIFEST in files) == (point == "before_commit")
        if point == "before_commit":  # complete and intact, yet never picked: not committed
            assert M.problems(st, st.join(tmp)) == []
    elif point in ("mid_shard", "after_shards", "before_commit"):  # written in place
        assert after.partial in (([], [step_name(FAULT_STEP)]) if point == "mid_shard" else
                                 ([step_name(FAULT_STEP)],))
        files = st.listdir(st.join(step_name(FAULT_STEP)))
        assert M.MANIFEST not in files  # never committed, so never resumed from
        assert point == "mid_shard" or "__1_0.distcp" in files
        assert point != "before_commit" or ".metadata" in files
    elif point == "mid_removal":  # never a committed dir with files missing
        assert after.partial == [step_name(2)]
        assert M.MANIFEST not in st.listdir(st.join(step_name(2)))
    else:
        assert after.partial == []
    if point == "mid_latest" and where == "local":
        [tmp_latest] = after.other
        assert tmp_latest.startswith(".latest.tmp-")
        assert st.read_text(st.join(tmp_latest)) == step_name(FAULT_STEP) + "\n"
    else:
        assert after.other == []

    resumed = run_train(2, [*args, "--auto_resume"], env=env)
    [resume] = metrics(log, "resume")
    assert (resume["step"], resume["path"], resume["note"]) == \
        (latest_step, st.join(step_name(latest_step)), "")
    assert "WARNING" not in resumed.stdout
    assert_same_as_reference(log, reference)
    final = dir_state(st)
    final.check()
    assert final.latest == step_name(N) and sorted(final.committed) == [step_name(N)]
    assert final.partial == [] and final.other == []  # retention removed what was abandoned
    assert_same_tensors(reference.final, fetch_step(st, step_name(N), tmp_path))


# ================================================================= 2. random-time SIGKILLs
def test_five_random_sigkills_then_finish_is_bit_exact(base, data, tmp_path):
    """tests/soak.py's loop with 5 kills (seeded delays 0.5-1.5 s after the first logged step),
    then a launch that stops 2 steps past the furthest step reached; the reference runs to
    the same step."""
    soak = run_with_kills(str(tmp_path / "ckpt"), tmp_path / "log", data, 5, 2024,
                          delays=(0.5, 1.5))
    ref = base / "soak-ref"
    resumes = check_against(tmp_path / "log", soak, run_reference(data, ref, soak.final_step))
    print(f"\nkilled: {[k.phase for k in soak.kills]}; resumed from steps {resumes}")
    final = step_name(soak.final_step)
    assert_same_tensors(load_checkpoint(ref / "ckpt" / final, tmp_path),
                        load_checkpoint(tmp_path / "ckpt" / final, tmp_path))


# ===================================================================== 3. flipped bytes
CORRUPT = {  # kind: (file under the checkpoint dir, what the message says)
    "shard": (f"{step_name(4)}/__0_0.distcp", "file __0_0.distcp is corrupt"),
    # at 2 ranks the two shards are CRC-checked by different ranks while loading
    "shard1": (f"{step_name(4)}/__1_0.distcp", "file __1_0.distcp is corrupt"),
    "metadata": (f"{step_name(4)}/.metadata", "file .metadata is corrupt"),
    "manifest": (f"{step_name(4)}/manifest.json", "manifest.json is "),
}


def test_flipped_byte_in_each_kind_of_file_is_detected(stopped, tmp_path):
    """In process, no training: what discovery and --checkpoint_path make of one flipped byte."""
    for kind, (rel, says) in CORRUPT.items():
        ckpt = tmp_path / kind
        shutil.copytree(stopped, ckpt)
        flip(ckpt / rel)
        step4 = str(ckpt / step_name(4))
        problem = CheckpointDir(str(ckpt), {}).check(step4)
        assert problem and says in problem, (kind, problem)
        with pytest.raises(CheckpointError, match=re.escape(says)):
            CheckpointDir(str(ckpt), {}).open(step4)
        found = CheckpointDir(str(ckpt), {}).find_latest()  # falls back, with a note
        assert found.step == 2 and says in found.note and step_name(2) in found.note

    # `latest`: every single-bit flip of every byte is detected (-> highest committed dir, with
    # a note), except the one that turns the trailing newline into another whitespace char
    good = (stopped / "latest").read_bytes()
    harmless = []
    for offset in range(len(good)):
        for bit in range(8):
            ckpt = tmp_path / "latest"
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.copytree(stopped, ckpt)
            flip(ckpt / "latest", offset, bit)
            found = CheckpointDir(str(ckpt), {}).find_latest()
            assert found.step == 4, (offset, bit)
            if not found.note:
                harmless.append((ckpt / "latest").read_bytes())
            else:
                assert "`latest` holds" in found.note and "falling back to step_00000004" in \
                    found.note, found.note
    assert harmless == [b"step_00000004\x0b"]  # \n -> \v: strip() still reads the same name


def test_verification_is_shared_across_ranks():
    """restore.load splits the CRC-32 checks: each file once, about equal bytes per rank."""
    files = {n: {"size": size} for n, size in
             [(".metadata", 10), ("__0_0.distcp", 100), ("__1_0.distcp", 90), ("__2_0.distcp", 95)]}
    assert _share(files, 1) == [["__0_0.distcp", "__2_0.distcp", "__1_0.distcp", ".metadata"]]
    assert _share(files, 2) == [["__0_0.distcp", ".metadata"], ["__2_0.distcp", "__1_0.distcp"]]
    assert sorted(n for share in _share(files, 8) for n in share) == sorted(files)


def test_verify_false_checks_sizes_only(stopped, tmp_path):
    """--verify_checkpoint false: the manifest no longer catches a flipped shard byte (the
    tensor is then loaded silently wrong: the price of skipping the CRC-32s); a flipped first
    byte of `.metadata` is still refused by the safe unpickler (for flips anywhere in it see
    `tests/soak.py --metadata_flips`); the manifest still checks itself."""
    ckpt = copy_stopped(stopped, tmp_path)
    step4 = ckpt / step_name(4)
    original = load_checkpoint(step4, tmp_path)
    fast = CheckpointDir(str(ckpt), {}, verify=False)

    flip(step4 / "__0_0.distcp", 3000)  # inside the data of model.transformer.wte.weight
    assert fast.check(str(step4)) is None  # sizes match: not caught
    assert "__0_0.distcp is corrupt" in CheckpointDir(str(ckpt), {}).check(str(step4))
    flipped = load_checkpoint(step4, tmp_path)
    assert [k for k in original if not torch.equal(original[k], flipped[k])] == \
        ["model.transformer.wte.weight"]  # loads, one tensor silently different
    shutil.copy(stopped / step_name(4) / "__0_0.distcp", step4 / "__0_0.distcp")

    flip(step4 / ".metadata", 0)  # the pickle's PROTO opcode
    assert fast.check(str(step4)) is None
    with pytest.raises(CheckpointError, match=r"\.metadata is not valid DCP metadata"):
        fast.open(str(step4))
    shutil.copy(stopped / step_name(4) / ".metadata", step4 / ".metadata")

    flip(step4 / M.MANIFEST)
    assert "manifest.json is " in fast.check(str(step4))


def test_verify_false_run_refuses_a_flipped_metadata_byte(stopped, data, tmp_path):
    ckpt = copy_stopped(stopped, tmp_path)
    flip(ckpt / step_name(4) / ".metadata", 0)
    before = snapshot(ckpt)
    proc = plain([*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), "--verify_checkpoint", "false", "--resume",
                  "--checkpoint_path", str(ckpt / step_name(4))])
    line = one_error(proc)
    assert f"{ckpt / step_name(4)}/.metadata is not valid DCP metadata" in line, line
    assert snapshot(ckpt) == before and not losses(tmp_path / "log")


@pytest.mark.parametrize("kind", [*CORRUPT, "latest"])
def test_corrupted_checkpoint_explicit_resume_fails_auto_resume_falls_back(
        kind, stopped, data, reference, tmp_path):
    ckpt, log = copy_stopped(stopped, tmp_path), tmp_path / "log"
    args = [*ARGS, *KEEP_ALL, "--data_dir", str(data), "--log_dir", str(log),
            "--checkpoint_dir", str(ckpt)]
    if kind == "latest":
        flip(ckpt / "latest", 0)  # "rtep_00000004"
        says, resume_step = ("`latest` holds 'rtep_00000004', which is not a committed step dir;"
                             " falling back to step_00000004"), 4
    else:
        rel, says = CORRUPT[kind]
        flip(ckpt / rel)
        resume_step = 2
        # --resume of the corrupted dir: one error line naming the file, nothing changed
        before = snapshot(ckpt)
        step4 = ckpt / step_name(4)
        line = one_error(plain([*args, "--resume", "--checkpoint_path", str(step4)]))
        assert f"--checkpoint_path {step4} is not a usable checkpoint: " in line and says in line
        assert snapshot(ckpt) == before and not losses(log)

    proc = run_train(2, [*args, "--auto_resume"])
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("WARNING: ")]
    assert len(warnings) == 1 and says in warnings[0], proc.stdout[-3000:]
    [resume] = metrics(log, "resume")
    assert resume["step"] == resume_step and resume["note"] == warnings[0][len("WARNING: "):]
    if kind != "latest":
        assert "falling back to step_00000002" in resume["note"]
    assert_same_as_reference(log, reference, first_step=resume_step + 1)
    state = dir_state(Storage(str(ckpt)))
    state.check()  # the corrupted step 4 was replaced by the resumed run's own save
    assert state.latest == step_name(N)
    assert sorted(state.committed) == [step_name(s) for s in (2, 4, 6)]
    assert_same_tensors(reference.final, load_checkpoint(ckpt / step_name(N), tmp_path))


# ===================================================================== 4. safe loading
class _Payload:
    """Unpickling this runs `touch <marker>` (what a tampered checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(step_dir: Path, metadata) -> None:
    """Replace .metadata and rewrite manifest.json consistently (hashes of the new file), so
    only the unpickler stands between the file and the process."""
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    storage = Storage(str(step_dir))
    manifest = json.loads((step_dir / M.MANIFEST).read_text())
    files = M.hash_files(storage, str(step_dir), sorted(manifest["files"]))
    (step_dir / M.MANIFEST).write_bytes(M.build(manifest["step"], manifest["world_size"], files))
    assert M.problems(storage, str(step_dir)) == []


def test_malicious_metadata_is_refused_and_never_runs(stopped, data, tmp_path):
    ckpt = copy_stopped(stopped, tmp_path)
    step4, marker = ckpt / step_name(4), tmp_path / "pwned"
    metadata = load_metadata((step4 / ".metadata").read_bytes(), "original")
    metadata.storage_meta.modules = [_Payload(marker)]
    _plant(step4, metadata)

    # the payload is live: torch's own reader (plain pickle.load) runs it
    subprocess.run([sys.executable, "-c", "import sys; from torch.distributed.checkpoint import "
                    "FileSystemReader; FileSystemReader(sys.argv[1]).read_metadata()",
                    str(step4)], check=True, env=child_env(), timeout=120)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"refusing to unpickle posix\.system"):
        CheckpointDir(str(ckpt), {}).open(str(step4))
    before = snapshot(ckpt)
    proc = plain([*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), "--auto_resume"])
    line = one_error(proc)
    assert f"{step4}/.metadata: refusing to unpickle posix.system" in line, line
    assert not marker.exists()
    assert snapshot(ckpt) == before and not losses(tmp_path / "log")


def test_no_byte_entries_in_our_checkpoints_and_planted_ones_are_refused(stopped, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    for name in (step_name(2), step_name(4)):
        metadata = load_metadata((stopped / name / ".metadata").read_bytes(), name)
        kinds = {type(v) for v in metadata.state_dict_metadata.values()}
        assert kinds == {TensorStorageMetadata}, kinds
    ckpt = copy_stopped(stopped, tmp_path)
    metadata.state_dict_metadata["extra"] = BytesStorageMetadata()
    _plant(ckpt / step_name(4), metadata)
    with pytest.raises(UnsafeCheckpointError, match=r"has pickled byte entries \['extra'\]"):
        load_metadata((ckpt / step_name(4) / ".metadata").read_bytes(), "planted")
    with pytest.raises(CheckpointError, match="has pickled byte entries"):
        CheckpointDir(str(ckpt), {}).find_latest()


# ======================================================================= 5. preemption
def _preempt(tmp_path, data, send) -> tuple[int, str, int]:
    """Start a run (checkpoints every 5 steps), call send(job) after step 1 is logged;
    returns (stop step, console, torchrun's exit code)."""
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    job = start_train(2, [*ARGS, "--checkpoint_interval", "5", "--data_dir", str(data),
                          "--log_dir", str(log), "--checkpoint_dir", str(ckpt)])
    console = Console(job)
    try:
        assert console.first_step.wait(timeout=300)
        send(job)
    except BaseException:
        kill_job(job)
        console.join()
        raise
    wait_job(job, console)
    out = "\n".join(console.lines)
    m = re.search(r"^preempted: stopped after step (\d+) with a checkpoint; exit code 75 ", out,
                  re.M)
    assert m, out[-4000:]
    stop = int(m.group(1))
    assert 1 < stop < 5, stop  # not a checkpoint step: the save is the preemption's own
    assert (ckpt / "latest").read_text() == step_name(stop) + "\n"
    assert max(losses(log)) == stop
    return stop, out, job.returncode


def _resume_bit_exact(tmp_path, data, reference, stop: int) -> None:
    log = tmp_path / "log"
    run_train(2, [*ARGS, "--checkpoint_interval", "5", "--data_dir", str(data), "--log_dir",
                  str(log), "--checkpoint_dir", str(tmp_path / "ckpt"), "--auto_resume"])
    [resume] = metrics(log, "resume")
    assert resume["step"] == stop and resume["note"] == ""
    assert_same_as_reference(log, reference)
    assert_same_tensors(reference.final,
                        load_checkpoint(tmp_path / "ckpt" / step_name(N), tmp_path))


def test_sigterm_to_torchrun_checkpoints_and_resumes_bit_exact(tmp_path, data, reference):
    stop, out, code = _preempt(tmp_path, data, lambda job: os.kill(job.pid, signal.SIGTERM))
    assert code == 1 and "Received 15 death signal, shutting down workers" in out
    assert out.count("dcp_train: got SIGTERM") == 1  # forwarded to both ranks, said once
    assert "forcefully exiting" not in out  # both ranks exited by themselves (code 75)
    _resume_bit_exact(tmp_path, data, reference, stop)


def test_sigusr1_to_the_ranks_checkpoints_exits_75_and_resumes_bit_exact(tmp_path, data,
                                                                        reference):
    def send(job):
        workers = descendants(job.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)

    stop, out, code = _preempt(tmp_path, data, send)
    assert code != 0 and out.count("dcp_train: got SIGUSR1") == 1  # one line per job
    codes = exit_codes(out)
    assert codes and set(codes.values()) == {75}, codes  # torchrun's report: the ranks' codes
    _resume_bit_exact(tmp_path, data, reference, stop)


# ======================================================================== 6. bad input
def _read_only(path: Path):
    """Make `path` read-only for root too: a read-only bind mount where mount works (it does
    in this container), else chattr +i; returns an undo function, None if neither works."""
    ro = path.with_name(path.name + "-ro")
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(ro)],
                      capture_output=True).returncode == 0:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)],
                          capture_output=True).returncode == 0:
            try:
                (ro / "probe").write_text("x")
            except OSError:
                return ro, lambda: subprocess.run(["umount", str(ro)], check=True)
        subprocess.run(["umount", str(ro)])
    ro.rmdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)],
                                                 capture_output=True).returncode == 0:
        return path, lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    return None, None


BAD = {  # case: (nproc, what the single error line must contain)
    "parent_is_a_file": (1, ["cannot write to checkpoint dir", "NotADirectoryError"]),
    "read_only_dir": (1, ["cannot write to checkpoint dir", "Read-only file system"]),
    "unknown_url_scheme": (1, ["cannot open checkpoint dir foo://x: ValueError: "
                               "Protocol not known: foo"]),
    "garbage_latest_nothing_committed": (2, [
        "no valid checkpoint in", "`latest` holds 'garbage!', which is not a committed step "
        "dir; move the directory away to start fresh"]),
    "latest_names_missing_dir_nothing_committed": (1, [
        "`latest` holds 'step_00000008', which is not a committed step dir"]),
    "empty_shard": (1, ["synth_train_000002.npy is empty (write shards with "
                        "dcp_train.data.prepare)"]),
    "int32_shard": (2, ["synth_train_000002.npy has dtype int32, expected uint16"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_error_line_and_nothing_changed(case, stopped, data, tmp_path):
    nproc, expected = BAD[case]
    ckpt, data_dir, undo = copy_stopped(stopped, tmp_path), data, None
    if case == "parent_is_a_file":
        (tmp_path / "afile").write_text("not a dir")
        ckpt = tmp_path / "afile" / "ckpt"
    elif case == "read_only_dir":
        ckpt, undo = _read_only(ckpt)
        if ckpt is None:
            pytest.skip("neither a read-only bind mount nor chattr +i works here")
        if ckpt.name == "ckpt":  # chattr +i: EPERM instead of EROFS
            expected = ["cannot write to checkpoint dir", "Operation not permitted"]
    elif case == "unknown_url_scheme":
        ckpt = "foo://x"
    elif case.endswith("nothing_committed"):
        for name in (step_name(2), step_name(4)):
            shutil.rmtree(ckpt / name)
        (ckpt / "latest").write_text("garbage!\n" if case.startswith("garbage")
                                     else step_name(8) + "\n")
    else:
        data_dir = tmp_path / "data"
        shutil.copytree(data, data_dir)
        bad = np.zeros(0, np.uint16) if case == "empty_shard" else np.arange(999, dtype=np.int32)
        np.save(data_dir / "synth_train_000002.npy", bad)
    try:
        before = snapshot(Path(ckpt)) if not str(ckpt).startswith("foo") else None
        args = [*ARGS, "--data_dir", str(data_dir), "--log_dir", str(tmp_path / "log"),
                "--checkpoint_dir", str(ckpt), "--auto_resume"]
        proc = plain(args) if nproc == 1 else run_train(2, args, check=False)
        line = one_error(proc)
        for text in expected:
            assert text in line, line
        if nproc == 2:  # said once for the job, and torchrun's Root Cause carries it
            assert (proc.stdout + proc.stderr).count("dcp_train: error") == 1
            assert line.removeprefix("dcp_train: error: ") in proc.stderr.split("Root Cause")[1]
        if before is not None:
            assert snapshot(Path(ckpt)) == before  # no lease, no step dir, `latest` untouched
        assert not losses(tmp_path / "log")
        print(f"\n{case}: {line}")
    finally:
        if undo:
            undo()


def test_latest_naming_a_missing_dir_falls_back_loudly(stopped, tmp_path):
    ckpt = copy_stopped(stopped, tmp_path)
    (ckpt / "latest").write_text(step_name(8) + "\n")
    found = CheckpointDir(str(ckpt), {}).find_latest()
    assert found.step == 4 and found.note == ("`latest` holds 'step_00000008', which is not a "
                                              "committed step dir; falling back to step_00000004")
    (ckpt / "latest").unlink()
    found = CheckpointDir(str(ckpt), {}).find_latest()
    assert found.step == 4 and found.note == "`latest` is missing; falling back to step_00000004"


# ======================================================================= 7. writer lease
def test_second_run_on_a_live_dir_is_refused_and_takes_over_after_sigkill(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    args = [*ARGS, "--max_steps", "1000", "--data_dir", str(data), "--checkpoint_dir", str(ckpt)]
    first = start_train(2, [*args, "--log_dir", str(tmp_path / "log1")])
    console = Console(first)
    try:
        assert console.first_step.wait(timeout=300)
        holder = json.loads((ckpt / "writer.lease").read_text())
        second = run_train(2, [*args, "--log_dir", str(tmp_path / "log2"), "--auto_resume"],
                           check=False)
        assert first.poll() is None, "the first run must still be alive"
        line = one_error(second)
        assert f"checkpoint dir {ckpt} is in use by run" in line
        assert f"(pid {holder['pid']} on {holder['host']}" in line
        assert f"delete {ckpt / 'writer.lease'}" in line
        assert not losses(tmp_path / "log2")
    finally:
        kill_job(first)
        console.join()
    latest = dir_state(Storage(str(ckpt))).latest_step
    t0 = time.monotonic()
    third = run_train(2, [*args, "--log_dir", str(tmp_path / "log3"), "--auto_resume",
                          "--stop_at_step", str((latest or 0) + 1)])
    assert "in use" not in third.stderr
    assert [r["step"] for r in metrics(tmp_path / "log3", "resume")] == ([latest] if latest else [])
    assert max(losses(tmp_path / "log3")) == (latest or 0) + 1
    print(f"\ntook over at once: {time.monotonic() - t0:.1f}s for the whole run")
