"""Starting and resuming rules (docs/design.md, "Starting and resuming"): a fresh start never
writes over a run; a checkpoint from a newer format is one clear error. Real torchrun."""

import json
import shutil
import subprocess
from pathlib import Path

import torch.distributed.checkpoint as dcp

from helpers import (TINY, child_env, load_checkpoint, one_error, run_train, torchrun_cmd,
                     tree_bytes, write_shards, REPO)

ARGS = [*TINY, "--batch_size", "4", "--total_batch_size", "256", "--max_steps", "4",
        "--checkpoint_interval", "2"]


def _launch(tmp_path: Path, data: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(2, [*ARGS, "--data_dir", str(data), "--log_dir",
                                           str(tmp_path / "log2"), "--checkpoint_dir",
                                           str(ckpt), *extra]),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def test_fresh_start_on_a_committed_run_is_refused_and_changes_nothing(tmp_path):
    data = write_shards(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    first = run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                          "--checkpoint_dir", str(ckpt), "--stop_at_step", "2"])
    assert ("stopped at step 2 (--stop_at_step), before --max_steps 4, with a checkpoint; "
            "continue with --auto_resume") in first.stdout.splitlines()
    before = tree_bytes(ckpt)
    proc = _launch(tmp_path, data, ckpt)
    assert one_error(proc) == (f"dcp_train: error: checkpoint dir {ckpt} holds a run at step 2; "
                               "pass --auto_resume to continue it or use another "
                               "--checkpoint_dir")
    assert tree_bytes(ckpt) == before


def _rewrite_format(step_dir: Path, out: Path, version) -> None:
    """A valid, committed copy of `step_dir` whose meta says format `version`."""
    from dcp_train.checkpoint.io import manifest as M
    from dcp_train.checkpoint.state import json_tensor, tensor_json
    from dcp_train.checkpoint.io.storage import Storage

    flat = load_checkpoint(step_dir, out.parent)
    meta = tensor_json(flat["meta"])
    meta["format_version"] = version
    flat["meta"] = json_tensor(meta)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
    names = sorted(p.name for p in out.iterdir())
    files = M.hash_files(Storage(str(out)), str(out), names)
    (out / "manifest.json").write_bytes(M.build(meta["step"], 1, files))


def _assert_refused(tmp_path: Path, data: Path, ckpt: Path, line: str) -> None:
    """--auto_resume from `ckpt` fails with exactly `line` and changes nothing there."""
    before = tree_bytes(ckpt)
    proc = _launch(tmp_path, data, ckpt, "--auto_resume")
    assert one_error(proc) == line
    assert tree_bytes(ckpt) == before


def test_checkpoint_of_a_newer_format_is_one_clear_error(tmp_path):
    data = write_shards(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), "--stop_at_step", "2"])
    newer = tmp_path / "newer"
    newer.mkdir()
    _rewrite_format(ckpt / "step_00000002", newer / "step_00000002", 2)
    (newer / "latest").write_text("step_00000002\n")
    _assert_refused(tmp_path, data, newer, (
        f"dcp_train: error: {newer / 'step_00000002'} has checkpoint format 2, newer than "
        "this dcp_train reads (1); resume it with the dcp_train version that wrote it, or "
        "upgrade"))

    # a manifest.json of a newer format is refused alike, never taken for damage (no fall-back)
    from dcp_train.checkpoint.io import manifest as M
    newer = tmp_path / "newer_manifest"
    shutil.copytree(ckpt / "step_00000002", newer / "step_00000002")
    (newer / "latest").write_text("step_00000002\n")
    manifest = json.loads((newer / "step_00000002" / "manifest.json").read_text())
    manifest["format_version"] = 3
    manifest["sha256"] = M._self_hash({k: v for k, v in manifest.items() if k != "sha256"})
    (newer / "step_00000002" / "manifest.json").write_text(json.dumps(manifest))
    _assert_refused(tmp_path, data, newer, (
        f"dcp_train: error: {newer / 'step_00000002' / 'manifest.json'} has manifest format 3 "
        "with checksum 'crc32c', newer than this dcp_train reads (formats 1-2, checksums "
        "crc32c, crc32); resume it with the dcp_train version that wrote it, or upgrade"))

    # the same rewrite at format 1 resumes: the refusal is the version, nothing else
    same = tmp_path / "same"
    same.mkdir()
    _rewrite_format(ckpt / "step_00000002", same / "step_00000002", 1)
    (same / "latest").write_text("step_00000002\n")
    proc = _launch(tmp_path, data, same, "--auto_resume")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _stopped_run(tmp_path: Path, stop: int = 2, *extra: str) -> tuple[Path, Path]:
    data = write_shards(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), "--stop_at_step", str(stop), *extra])
    return data, ckpt


def test_a_changed_data_stream_is_refused_at_any_world_size(tmp_path):
    """--seed, other data of the same sizes, --seq_len: one line naming the setting, exit 2,
    the checkpoint dir byte for byte unchanged, at the saved world size and at another."""
    data, ckpt = _stopped_run(tmp_path)
    other = write_shards(tmp_path / "other", seed=1)  # same names and sizes, other tokens
    before = tree_bytes(ckpt)
    cases = [(["--data_dir", str(data), "--seed", "7"], "--seed 7 (the saved run used 1337)"),
             (["--data_dir", str(other)], f"other training data in --data_dir {other}"),
             (["--data_dir", str(data), "--seq_len", "16"], "--seq_len 16 (the saved run "
                                                            "used 32)")]
    for nproc in (2, 1):
        for extra, says in cases:
            proc = subprocess.run(
                torchrun_cmd(nproc, [*ARGS, "--log_dir", str(tmp_path / "log2"),
                                     "--checkpoint_dir", str(ckpt), "--auto_resume", *extra]),
                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
            line = one_error(proc)
            assert line.startswith(f"dcp_train: error: cannot resume {ckpt / 'step_00000002'} "
                                   "with these flags: ") and says in line, (nproc, line)
            assert tree_bytes(ckpt) == before


def test_accepted_changes_are_reported_and_an_extended_run_keeps_its_schedule(tmp_path):
    """--max_lr and --max_steps may change: a WARNING line each and `changes` in the resume
    record; with --lr_schedule continue the cosine of the saved run (4 steps) goes on: the
    extra steps run at its final LR. A checkpoint at --max_steps says so."""
    from helpers import metrics

    data, ckpt = _stopped_run(tmp_path, 4)  # a finished run: max_steps 4
    log = tmp_path / "log"
    lrs = {r["step"]: r["lr"] for r in metrics(log, "train")}
    proc = run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                         "--checkpoint_dir", str(ckpt), "--auto_resume"])
    assert "checkpoint is at step 4 and --max_steps is 4: nothing to train" in proc.stdout
    proc = run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(log),
                         "--checkpoint_dir", str(ckpt), "--auto_resume", "--max_steps", "6",
                         "--weight_decay", "0.05"])
    assert "WARNING: --max_steps changed on resume: 4 -> 6" in proc.stdout
    assert "WARNING: --weight_decay changed on resume: 0.1 -> 0.05" in proc.stdout
    resume = metrics(log, "resume")[-1]
    assert resume["changes"] == {"max_steps": [4, 6], "weight_decay": [0.1, 0.05]}
    new = {r["step"]: r["lr"] for r in metrics(log, "train") if r["step"] > 4}
    assert new == {5: 3e-3 * 0.1, 6: 3e-3 * 0.1}  # the saved cosine ended at step 4
    assert lrs[4] > new[5]


def test_a_resume_behind_newer_steps_is_refused_unless_told(tmp_path):
    """Resuming from step 2 of a dir whose newest step is 4 would replace step 4: refused in
    one line naming step 4 and the two ways on, nothing created (no log dir either);
    --drop_newer_checkpoints goes on, says which steps go, and deletes them only at its first
    save (checkpoint/newer.py). (--auto_resume from a `latest` behind a committed step is a
    save killed before `latest`: test_faults' after_commit and mid_latest points.)"""
    data = write_shards(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt)])
    step_2 = ckpt / "step_00000002"
    refusal = (f"dcp_train: error: --checkpoint_dir {ckpt} holds committed steps newer than "
               "step 2, which this run resumes from: 4; its saves would replace them. Use "
               "another --checkpoint_dir to keep them, or pass --drop_newer_checkpoints to "
               "delete them at this run's first save")
    before = tree_bytes(ckpt)
    proc = _launch(tmp_path, data, ckpt, "--resume", "--checkpoint_path", str(step_2))
    assert one_error(proc) == refusal
    assert tree_bytes(ckpt) == before
    assert not (tmp_path / "log2").exists()

    proc = _launch(tmp_path, data, ckpt, "--resume", "--checkpoint_path", str(step_2),
                   "--drop_newer_checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    announced = lines.index(f"--drop_newer_checkpoints: steps 4 of {ckpt} will be deleted at "
                            "this run's first save (resuming from step 2)")
    dropped = lines.index(f"--drop_newer_checkpoints: deleted step_00000004 from {ckpt}")
    first_step = next(i for i, l in enumerate(lines) if l.startswith("step      3 |"))
    saved = next(i for i, l in enumerate(lines) if "checkpoint" in l and "committed" in l)
    assert announced < first_step < dropped < saved  # the old step 4 lived until the save
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (ckpt / "latest").read_text() == "step_00000004\n"


def test_a_fresh_run_giving_up_on_its_store_says_what_happened():
    """A fresh run (no --resume/--auto_resume) whose store refuses past the budget: the line
    names the start, not a resume, and says nothing was written (the manager's phase FRESH);
    a resume's says the last committed checkpoint is intact."""
    import pytest

    from dcp_train.checkpoint.ride_out import FRESH, Patience, StoreTrouble, ride_out
    from dcp_train.errors import StoreUnavailable

    def refuse():
        raise StoreTrouble("storage endpoint unreachable")
    for what, then in ((FRESH, "nothing was written, relaunch once the store answers"),
                       ("the resume (discovery)", "the last committed checkpoint is intact, "
                        "relaunch with --auto_resume once the store answers")):
        with pytest.raises(StoreUnavailable) as e:
            ride_out(refuse, Patience(0.0, 30.0), "s3://b/ckpt", what, collective=False)
        assert str(e.value).startswith(f"s3://b/ckpt refused requests for 0 s during {what}")
        assert str(e.value).endswith(f"storage endpoint unreachable; {then}"), str(e.value)
    assert "resume" not in FRESH


def test_two_tiers_the_local_tiers_newer_steps_are_refused_alike(tmp_path):
    """--resume from step 2 with a --local_checkpoint_dir that holds steps 3 and 4: refused
    naming the local tier's steps (a new durable dir holds none); --drop_newer_checkpoints
    deletes them at the first save, and the run ends with the local tier at its own steps."""
    data = write_shards(tmp_path / "data")
    ckpt, local = tmp_path / "ckpt", tmp_path / "local"
    tiers = ["--local_checkpoint_dir", str(local), "--local_checkpoint_interval", "1"]
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                  "--checkpoint_dir", str(ckpt), *tiers])
    assert {"step_00000003", "step_00000004"} <= {p.name for p in local.glob("step_*")}
    before = tree_bytes(local)
    how = ["--resume", "--checkpoint_path", str(ckpt / "step_00000002"), *tiers]
    proc = _launch(tmp_path, data, tmp_path / "new", *how)
    assert one_error(proc) == (
        f"dcp_train: error: --local_checkpoint_dir {local} holds committed steps newer than "
        "step 2, which this run resumes from: 3, 4; its saves would replace them. Use another "
        "--local_checkpoint_dir to keep them, or pass --drop_newer_checkpoints to delete them "
        "at this run's first save")
    assert tree_bytes(local) == before and not (tmp_path / "new").exists()

    proc = _launch(tmp_path, data, tmp_path / "new", *how, "--drop_newer_checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--drop_newer_checkpoints: deleted local steps 3, 4 from {local}" in proc.stdout
    assert (local / "latest").read_text() == "step_00000004\n"
    assert (tmp_path / "new" / "latest").read_text() == "step_00000004\n"
