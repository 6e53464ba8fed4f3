"""Credentials never persist (issue 13, point 1): storage options given with keys, and keys in
the environment, appear in no checkpoint object, no log file, no console line, no error line,
and `dcp-ckpt inspect` never shows them, not even for a checkpoint written by older code.

A real 2-rank run against the local S3 server (moto does not check signatures, so any key
works), then every object under the run's prefix, every file of the log dir and all captured
output are searched for the secret strings.
Run: .venv/bin/python -m pytest tests/test_secrets.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import torch
import torch.distributed.checkpoint as dcp

from helpers import REPO, TINY, child_env, metrics, run_train, write_shards

from dcp_train import redact
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.state import json_tensor

KEY, SECRET, TOKEN = "AKIAFAKEKEY7Q2X9Z", "fake-secret-9f8e7d6c5b4a3", "fake-session-0a1b2c3d"
ENV_SECRET = "env-secret-5e6f7a8b9c"
SECRETS = (KEY, SECRET, TOKEN, ENV_SECRET)


def _options(s3) -> dict:
    return {"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET, "token": TOKEN,
            "client_kwargs": {"region_name": "us-east-1"}}


def _env(s3) -> dict:
    return {**s3.env, "AWS_SECRET_ACCESS_KEY": ENV_SECRET}


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_the_rule():
    options = {"key": "k1", "secret": "s1", "endpoint_url": "http://h:9000", "anon": False,
               "client_kwargs": {"region_name": "eu", "aws_session_token": "t1"},
               "config_kwargs": {"retries": {"max_attempts": 2}},
               "headers": {"Authorization": "Bearer abc"}, "token": {"type": "service"},
               "Client-Secret": "c1", "password": 1234, "proxy": "http://u:pw9@proxy:3128",
               "sse_customer_key": "x", "credentials": ["a", "b"]}
    R = redact.REDACTED
    assert redact.redact(options) == {
        "key": R, "secret": R, "endpoint_url": "http://h:9000", "anon": False,
        "client_kwargs": {"region_name": "eu", "aws_session_token": R},
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "headers": {"Authorization": R}, "token": R, "Client-Secret": R, "password": R,
        "proxy": f"http://u:{R}@proxy:3128", "sse_customer_key": R, "credentials": R}
    assert redact.redact_options_text('{"key": "k"') == R  # not JSON: all of it
    redact.remember({"a": {"secret": "zz-secret-1"}, "proxy": "http://u:pw-22-long@h"},
                    environ={"MY_API_TOKEN": "tok-333-long", "HOME": "/root",
                             "SHORT_KEY": "1234"})  # too short to scrub: would mangle numbers
    assert redact.scrub("x zz-secret-1 pw-22-long tok-333-long /root 1234 http://v:pw@h") == \
        f"x {R} {R} {R} /root 1234 http://v:{R}@h"


def test_a_run_on_s3_stores_and_prints_no_credential(s3, tmp_path):
    data = write_shards(tmp_path / "data")
    log = tmp_path / "log"
    common = [*TINY, "--batch_size", "4", "--total_batch_size", "512", "--max_steps", "3",
              "--checkpoint_interval", "2", "--data_dir", str(data), "--log_dir", str(log)]
    args = [*common, "--checkpoint_dir", "s3://ckpt/secret-run",
            "--storage_options", json.dumps(_options(s3))]
    first = run_train(2, args, env=_env(s3))
    second = run_train(2, [*args, "--auto_resume", "--max_steps", "4"], env=_env(s3))
    inspect = subprocess.run(
        [sys.executable, "-m", "dcp_train.ckpt", "inspect", "s3://ckpt/secret-run", "--json",
         "--storage_options", json.dumps(_options(s3))],
        cwd=REPO, env=child_env(_env(s3)), capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    # errors: a bucket that does not exist, and --storage_options that is not JSON
    bad = [*common, "--checkpoint_dir", "s3://no-such-bucket/x"]
    errors = [subprocess.run([sys.executable, "-m", "dcp_train.main", *extra], cwd=REPO,
                             env=child_env(_env(s3)), capture_output=True, text=True,
                             timeout=180)
              for extra in ([*bad, "--storage_options", json.dumps(_options(s3))],
                            [*bad, "--storage_options", '{"secret": "%s",' % SECRET])]
    for proc in errors:
        assert proc.returncode == 2 and proc.stderr.startswith("dcp_train: error: "), proc.stderr
    assert "no such bucket" in errors[0].stderr and "not valid JSON" in errors[1].stderr

    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.invalidate_cache()
    objects = fs.find("ckpt/secret-run")
    assert any(o.endswith("/manifest.json") for o in objects) and len(objects) > 10
    for obj in objects:  # every object, bytes searched (latin-1 keeps every byte)
        assert not _leaks(fs.cat_file(obj).decode("latin-1")), obj
    files = [p for p in log.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert not _leaks(path.read_text(errors="replace")), path
    for proc in (first, second, inspect, *errors):
        assert not _leaks(proc.stdout + proc.stderr), proc.args
    # what is stored instead: the options with the credentials replaced
    configs = metrics(log, "config")  # the refused missing-bucket launch wrote none
    assert [c["world_size"] for c in configs] == [2, 2] and json.loads(configs[0]["config"]["storage_options"]) == {
        **_options(s3), "key": redact.REDACTED, "secret": redact.REDACTED,
        "token": redact.REDACTED}
    assert json.loads(json.loads(inspect.stdout)["meta"]["config"]["storage_options"])[
        "secret"] == redact.REDACTED


def test_inspect_redacts_a_checkpoint_written_with_keys_in_clear(tmp_path):
    """Older code stored the options as given: `dcp-ckpt inspect` redacts on display."""
    options = json.dumps({"key": KEY, "secret": SECRET, "endpoint_url": "http://h"})
    meta = {"format_version": 1, "step": 2, "tokens": 0, "val_loss": None, "world_size": 1,
            "config": {"storage_options": options, "checkpoint_dir": "s3://b/run",
                       "model": {"n_layer": 1}}}
    step = tmp_path / "step_00000002"
    dcp.save({"meta": json_tensor(meta), "model.w": torch.zeros(2)},
             checkpoint_id=str(step), no_dist=True)
    names = sorted(p.name for p in step.iterdir())  # committed: inspect reads only those
    (step / M.MANIFEST).write_bytes(M.build(2, 1, M.hash_files(Storage(str(step)), str(step),
                                                               names)))
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "dcp_train.ckpt", "inspect",
                               str(tmp_path / "step_00000002"), *extra], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert not _leaks(proc.stdout + proc.stderr)
        assert redact.REDACTED in proc.stdout and "http://h" in proc.stdout
