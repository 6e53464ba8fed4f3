"""What a save and a resume ask of an object store, counted at the store.

Real moto S3 server on 127.0.0.1, whose own request log is the count (servers.S3Server
.requests): nothing the client reports is taken on trust. A micro GPT (1 layer, 32 dims), one
step per run, at 1, 2, 4 and 8 ranks:

    fresh    s3://ckpt/n<N>   --max_steps 1: the probe, the lease, one save, the release
    resumed  s3://ckpt/n<N>   --auto_resume --max_steps 2: discovery, load, one save

Done when (issue 24): 1 rank at most 15 requests fresh and 20 resumed; each extra rank adds at
most its own data files + 1 to a save and + 2 to a resume (linear, never quadratic); the
`checkpoint` and `resume` records carry exactly what the server saw of those phases, by kind;
dcp-ckpt prints what it sent.

Run: .venv/bin/python -m pytest tests/test_requests.py -q
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest

from helpers import TINY, child_env, metrics, of_kind, run_train, s3fs_of, wait_for

RANKS = (1, 2, 4, 8)
MICRO = [*TINY, "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "1",
         "--total_batch_size", str(32 * 8), "--seed", "7", "--checkpoint_interval", "100"]
LEASE = "writer.lease"


def kinds(requests: list[tuple[str, str]]) -> Counter:
    """Requests by kind, as the server saw them (independent of store_requests.kind)."""
    out = Counter()
    for method, target in requests:
        if method == "GET" and "list-type=" in target:
            out["LIST"] += 1
        elif method == "POST" and re.search(r"\?delete\b", target):
            out["DELETE"] += 1
        else:
            out[method] += 1
    return out


def run_counted(s3, nproc: int, args: list[str]) -> Counter:
    """Run a job and return the requests the server answered for it, by kind. The lease's
    DELETE is every run's last request: its log line closes the count."""
    start = len(s3.requests())
    run_train(nproc, [*MICRO, *args], env=s3.env, timeout=600)
    wait_for(lambda: any(m == "DELETE" and LEASE in t for m, t in s3.requests()[start:]),
             timeout=10)
    return kinds(s3.requests()[start:])


@pytest.fixture(scope="module")
def counted(s3, data, base) -> dict:
    """{ranks: {"fresh", "resumed": server counts, "save", "resume": the records' counts,
    "files": data files per rank}} for every N of RANKS."""
    out = {}
    for n in RANKS:
        ckpt, log = f"s3://ckpt/n{n}", base / f"n{n}"
        common = ["--data_dir", str(data), "--checkpoint_dir", ckpt, "--log_dir", str(log)]
        fresh = run_counted(s3, n, [*common, "--max_steps", "1"])
        [fresh_save] = metrics(log, "checkpoint")
        resumed = run_counted(s3, n, [*common, "--max_steps", "2", "--auto_resume"])
        records = metrics(log)
        [resume] = of_kind(records, "resume")
        save = of_kind(records, "checkpoint")[-1]
        names = s3fs_of(s3).ls(f"ckpt/n{n}/step_00000002", detail=False)
        per_rank = Counter(m.group(1) for p in names
                           if (m := re.search(r"__(\d+)_\d+\.distcp$", p)))
        assert sorted(per_rank) == [str(r) for r in range(n)]
        out[n] = {"fresh": fresh, "resumed": resumed, "fresh_save": fresh_save["requests"],
                  "save": save["requests"], "resume": resume["requests"],
                  "files": max(per_rank.values())}
    return out


def total(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k != "total")


def test_one_rank_at_most_15_fresh_and_20_resumed(counted):
    one = counted[1]
    assert total(one["fresh"]) <= 15, one["fresh"]
    assert total(one["resumed"]) <= 20, one["resumed"]
    assert one["fresh"]["HEAD"] == 0 and one["resumed"]["HEAD"] == 0  # sizes are known


@pytest.mark.parametrize("n", RANKS[1:])
def test_each_rank_adds_its_files_plus_one_to_a_save_and_two_to_a_resume(counted, n):
    one, many, extra = counted[1], counted[n], n - 1
    files = many["files"]
    # at the server: a fresh run is its save plus a constant; a resumed run adds a resume
    assert total(many["fresh"]) - total(one["fresh"]) <= extra * (files + 1), many["fresh"]
    assert total(many["resumed"]) - total(one["resumed"]) <= extra * (2 * files + 3), \
        many["resumed"]
    # the records, phase by phase
    assert many["save"]["total"] - one["save"]["total"] <= extra * (files + 1), many["save"]
    assert many["resume"]["total"] - one["resume"]["total"] <= extra * (files + 2), \
        many["resume"]


@pytest.mark.parametrize("n", RANKS)
def test_records_carry_what_the_server_saw(counted, n):
    """resumed run = resume record + checkpoint record + the lease's release (GET, DELETE);
    fresh run = checkpoint record + probe listing, lease look and write + release."""
    c = counted[n]
    resumed = Counter({k: v for k, v in c["resume"].items() if k != "total"})
    resumed.update({k: v for k, v in c["save"].items() if k != "total"})
    resumed.update({"GET": 1, "DELETE": 1})
    assert c["resumed"] == resumed
    fresh = Counter({k: v for k, v in c["fresh_save"].items() if k != "total"})
    fresh.update({"LIST": 1, "GET": 2, "PUT": 1, "DELETE": 1})
    assert c["fresh"] == fresh


def test_dcp_ckpt_prints_its_requests(s3, counted):
    env = child_env(s3.env)
    out = subprocess.run([sys.executable, "-m", "dcp_train.ckpt", "ls", "s3://ckpt/n1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"store requests: \d+ requests \(.*LIST \d+.*\)", line), line
    out = subprocess.run([sys.executable, "-m", "dcp_train.ckpt", "verify", "s3://ckpt/n1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "store requests:" in out.stdout, out.stdout + out.stderr
