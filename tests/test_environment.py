"""Environmental failures named in words (issue 13, point 7): real full, read-only and
forbidden filesystems, a real unreachable endpoint, S3's SlowDown as s3fs raises it; a real
run whose save does not fit on a small tmpfs refuses before writing, keeps what was committed,
and resumes bit-exact once there is room. Mounting needs root (skipped otherwise).
Run: .venv/bin/python -m pytest tests/test_environment.py -q
"""

from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import (TINY, assert_same_tensors, free_port, load_checkpoint, losses, metrics,
                     run_train, tmpfs, write_shards)

from dcp_train import errors
from dcp_train.checkpoint.io.names import step_name
from dcp_train.checkpoint.layout import CheckpointDir

NO_SPACE = "no space left on the filesystem of {} (disk full or quota)"


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        return e
    raise AssertionError("no exception")


def test_a_full_filesystem_is_named_with_numbers(tmp_path):
    with tmpfs(tmp_path / "full", "1m") as mnt:
        def fill():
            with open(mnt / "big", "wb") as f:
                f.write(b"\0" * 2**21)
        e = _raised(fill)
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC
        line = errors.describe(e, str(mnt))
        assert line.startswith(NO_SPACE.format(mnt) + ": 0 bytes free; free space there"), line
        assert line.endswith("(OSError: [Errno 28] No space left on device)")
        # torch.save on a full disk says "unexpected pos ...": named by the free space left
        e = _raised(lambda: torch.save({"t": torch.zeros(2**16)}, mnt / "t.pt"))
        assert "unexpected pos" in str(e) or "enforce fail" in str(e) or \
            getattr(e, "errno", None) == errno.ENOSPC, repr(e)
        assert errors.describe(e, str(mnt)).startswith(NO_SPACE.format(mnt))
        # DCP wraps it into its CheckpointException
        (mnt / "big").unlink()
        e = _raised(lambda: dcp.save({"t": torch.zeros(2**19)}, checkpoint_id=str(mnt / "ck"),
                                     no_dist=True))
        assert errors.describe(e, str(mnt / "ck")).startswith(NO_SPACE.format(mnt / "ck"))


def test_read_only_permission_unreachable_throttled_and_unknown(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", "ro") as mnt:
        e = _raised(lambda: open(mnt / "x", "wb"))
        assert errors.describe(e).startswith("read-only filesystem; remount it writable")
    locked = tmp_path / "immutable"
    locked.write_text("x")
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:
        try:  # EPERM, for root too
            e = _raised(lambda: open(locked, "a"))
        finally:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        assert isinstance(e, PermissionError)
        assert errors.describe(e).startswith("permission denied; check the directory's ")
    e = PermissionError(errno.EACCES, "Permission denied", "/ckpt/x")
    assert errors.describe(e).startswith("permission denied; check the directory's ")

    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True,
                           endpoint_url=f"http://127.0.0.1:{free_port()}",
                           config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2})
    e = _raised(lambda: fs.ls("bucket"))
    line = errors.describe(e)
    assert line.startswith("storage endpoint unreachable; check the endpoint URL"), line
    assert "EndpointConnectionError" in line

    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request "
                                  "rate."}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                       "PutObject")
    e = translate_boto_error(slow)  # what s3fs raises: OSError(EBUSY) from the ClientError
    assert isinstance(e, OSError) and e.__cause__ is slow
    line = errors.describe(e)
    assert line.startswith("throttled by the store (SlowDown/503/429); retry later"), line
    gcsfs = pytest.importorskip("gcsfs")
    e = gcsfs.retry.HttpError({"code": 429, "message": "rate limit exceeded"})
    assert errors.describe(e).startswith("throttled by the store")
    assert errors.describe(ValueError("bad value\nmore")) == "ValueError: bad value"


# ------------------------------------------------------------------------ a run on a full disk
N = 6
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--max_steps", str(N), "--checkpoint_interval", "2"]


def test_a_save_that_does_not_fit_is_refused_and_the_run_resumes_bit_exact(tmp_path):
    data = write_shards(tmp_path / "data")
    run_train(2, [*ARGS, "--data_dir", str(data), "--log_dir", str(tmp_path / "ref_log"),
                  "--checkpoint_dir", str(tmp_path / "ref")])
    one_checkpoint = sum(f.stat().st_size for f in (tmp_path / "ref" / step_name(2)).iterdir())
    log = tmp_path / "log"
    args = [*ARGS, "--data_dir", str(data), "--log_dir", str(log)]
    # room for one checkpoint, not two
    with tmpfs(tmp_path / "small", f"{one_checkpoint * 3 // 2 // 4096 * 4}k") as mnt:
        proc = run_train(2, [*args, "--checkpoint_dir", str(mnt)], check=False)
        assert proc.returncode != 0
        lines = {l for l in proc.stderr.splitlines() if l.startswith("dcp_train: error:")}
        assert len(lines) == 1, proc.stderr[-3000:]
        m = re.fullmatch(r"dcp_train: error: saving step 4 refused: " + re.escape(
            NO_SPACE.format(mnt)) + r": needs about ([\d,]+) bytes, ([\d,]+) bytes free; free "
            r"space there, lower --keep_last_n_checkpoints, or use another --checkpoint_dir",
            lines.pop())
        assert m, proc.stderr[-3000:]
        needed, free = (int(g.replace(",", "")) for g in m.groups())
        assert free < one_checkpoint < needed * 1.02 and needed < one_checkpoint * 1.06, (
            needed, one_checkpoint, free)
        assert "unexpected pos" not in proc.stderr and "enforce fail" not in proc.stderr
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)  # torchrun's report
        assert codes and set(codes) == {"2"}, proc.stderr[-3000:]
        # nothing was written for step 4; step 2 is committed, intact, and named by `latest`
        assert sorted(os.listdir(mnt)) == ["latest", step_name(2), "writer.lease"]
        assert (mnt / "latest").read_text() == step_name(2) + "\n"
        assert CheckpointDir(str(mnt), {}).check(str(mnt / step_name(2))) is None
        assert max(losses(log)) == 4

        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)  # room now
        run_train(2, [*args, "--checkpoint_dir", str(mnt), "--auto_resume"])
        [resume] = metrics(log, "resume")
        assert resume["step"] == 2 and resume["note"] == ""
        ref = losses(tmp_path / "ref_log")
        train = metrics(log, "train")
        assert [(r["step"], r["loss"]) for r in train] == [(r["step"], ref[r["step"]])
                                                           for r in train]
        assert_same_tensors(load_checkpoint(tmp_path / "ref" / step_name(N), tmp_path),
                            load_checkpoint(mnt / step_name(N), tmp_path))
