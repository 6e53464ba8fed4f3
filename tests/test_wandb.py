"""--wandb in WANDB_MODE=offline (no network, no account): the run files hold the records.

A 2-rank run stops at step 2 with a checkpoint, then an --auto_resume launch finishes it at
step 4. Read back from wandb's own offline files (`run-<id>.wandb`, a leveldb-style log of
wandb's protobuf records, parsed here with wandb's own proto classes):
- both launches wrote the same run id, the one kept in the checkpoint's meta (`wandb_id`);
- the history holds every train record of metrics.jsonl, field for field and bit for bit
  (loss, lr, grad_norm, tokens at each step), the resume marker and the checkpoint events;
- the run's config is the `config` record's (credentials redacted: a secret passed in
  --storage_options is in neither file);
- wandb's console capture is off and WANDB_SILENT works: stdout is the trainer's alone.
Without the wandb package, --wandb is one error line.

Run: .venv/bin/python -m pytest tests/test_wandb.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, TINY, child_env, load_checkpoint, metrics, of_kind, run_train

SECRET = "hunter2-wandb-secret"
ARGS = TINY + ["--batch_size", "4", "--total_batch_size", "256", "--max_steps", "4",
               "--checkpoint_interval", "2", "--wandb", "--wandb_project", "dcp-test",
               "--storage_options", json.dumps({"secret": SECRET})]


def wandb_records(path) -> list:
    """The protobuf Records of a `.wandb` file: a 7-byte header (":W&B", magic, version),
    then leveldb log blocks of 32 KiB, each record chunk behind a 7-byte header (CRC-32C,
    length, type 1 full / 2 first / 3 middle / 4 last); a block tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in r.history.item})
    return rows


@pytest.fixture(scope="module")
def runs(base, data):
    common = ARGS + ["--data_dir", str(data), "--log_dir", str(base / "log"),
                     "--checkpoint_dir", str(base / "ckpt")]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(base / "wandb"), "WANDB_SILENT": "true"}
    first = run_train(2, common + ["--stop_at_step", "2"], env=env)
    second = run_train(2, common + ["--auto_resume"], env=env)
    dirs = sorted((base / "wandb" / "wandb").glob("offline-run-*"))
    return base, dirs, first, second


def test_resume_continues_the_same_run(runs):
    base, dirs, _, _ = runs
    meta = json.loads(bytes(load_checkpoint(base / "ckpt" / "step_00000004", base)["meta"]
                            .tolist()))
    run_id = meta["wandb_id"]
    assert run_id and len(dirs) == 2, dirs
    for d in dirs:
        assert d.name.endswith(f"-{run_id}")
        (run,) = [r.run for r in wandb_records(d / f"run-{run_id}.wandb")
                  if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.project) == (run_id, "dcp-test")


def test_history_holds_the_metrics_records(runs):
    base, dirs, _, _ = runs
    records = [r for d in dirs for r in wandb_records(next(d.glob("run-*.wandb")))]
    rows = history(records)
    train = {r["step"]: r for r in rows if "train/loss" in r}
    jsonl = metrics(base / "log")
    for rec in of_kind(jsonl, "train"):
        for field in ("loss", "lr", "grad_norm", "tokens", "batch_digest"):
            assert train[rec["step"]][f"train/{field}"] == rec[field], (rec["step"], field)
    assert sorted(train) == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "resume/path" in r] == [2]
    assert sorted(r["step"] for r in rows if "checkpoint/path" in r) == [2, 4]
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {i.key: json.loads(i.value_json) for c in configs for i in c.update}
    assert keys["config"]["model"]["n_layer"] == 2 and keys["world_size"] == 2
    assert keys["config"]["wandb_project"] == "dcp-test"
    for d in dirs:
        for f in d.rglob("*"):
            assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f


def test_console_is_the_trainers(runs):
    _, _, first, second = runs
    for proc in (first, second):
        assert not [l for l in proc.stdout.splitlines() if l.lower().startswith("wandb")]
        assert "| loss " in proc.stdout


def test_missing_package_is_one_error(data, tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; from dcp_train.main import main; "
            "main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *ARGS, "--data_dir", str(data),
                           "--log_dir", str(tmp_path / "log"),
                           "--checkpoint_dir", str(tmp_path / "ckpt")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dcp_train: error: --wandb needs the wandb package: pip install 'dcp_train[wandb]' "
        "(or pip install wandb)"]
    assert not (tmp_path / "ckpt").exists()
