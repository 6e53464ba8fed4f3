"""Shared helpers for tests that run real `torchrun` jobs on CPU/gloo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dcp_train.job.metrics import of_kind
from dcp_train.tools.export import load_full_state

from procs import REPO, SHARED_TIKTOKEN, child_env, descendants, free_port, torchrun  # noqa: F401

# A tiny GPT and a short schedule: 2 layers, 64 dims, vocab 512, sequences of 32 tokens.
TINY = ["--preset", "tiny", "--vocab_size", "512", "--block_size", "32", "--seq_len", "32",
        "--warmup_steps", "3", "--max_lr", "3e-3", "--eval_interval", "0",
        "--hellaswag_interval", "0", "--generate_interval", "0"]


def write_shards(data_dir: Path, n_train_tokens: int = 40_000, n_val_tokens: int = 4_000,
                 vocab: int = 512, seed: int = 0) -> Path:
    """Synthetic uint16 token shards (a learnable pattern plus noise), build-nanogpt names."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def tokens(n):
        base = np.arange(n) % 17 * 7 % vocab
        noise = rng.integers(0, vocab, n)
        return np.where(rng.random(n) < 0.3, noise, base).astype(np.uint16)

    np.save(data_dir / "synth_val_000000.npy", tokens(n_val_tokens))
    half = n_train_tokens // 2
    np.save(data_dir / "synth_train_000001.npy", tokens(half))
    np.save(data_dir / "synth_train_000002.npy", tokens(n_train_tokens - half))
    return data_dir


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    """torchrun of the trainer (`-m dcp_train.main`) with `args`."""
    return torchrun(nproc, ["-m", "dcp_train.main", *args])


def run_train(nproc: int, args: list[str], env: dict | None = None, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, args), cwd=REPO, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_dirs(root: Path, data: Path) -> list[str]:
    """The flags of a run under `root`: the token shards in `data`, root/log, root/ckpt."""
    return ["--data_dir", str(data), "--log_dir", str(root / "log"),
            "--checkpoint_dir", str(root / "ckpt")]


def finish_job(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a job started with its own session (torchrun, a launch script): it must end
    with exit 0 (killed with everything below it if it does not end); its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-8000:]}"
    return out


def train_to(nproc: int, extra: list[str], env: dict | None, log: Path, ckpt, check: bool = True,
             timeout: float = 300, args: list[str] = ()) -> subprocess.CompletedProcess:
    """run_train of `args` + `extra` with `log` as --log_dir and `ckpt` (a path or a URL) as
    --checkpoint_dir (a module binds its own flags: functools.partial(train_to, args=ARGS))."""
    return run_train(nproc, [*args, "--log_dir", str(log), "--checkpoint_dir", str(ckpt), *extra],
                     env=env, check=check, timeout=timeout)


def train_in(out: Path, data: Path, *extra: str, args: list[str] = (), nproc: int = 2,
             env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """train_to of the token shards in `data`, with out/log and out/ckpt as its dirs."""
    return train_to(nproc, ["--data_dir", str(data), *extra], env, out / "log", out / "ckpt",
                    check, args=args)


def start_train(nproc: int, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start torchrun in its own process group (so a test can SIGKILL the whole job)."""
    return subprocess.Popen(torchrun_cmd(nproc, args), cwd=REPO, env=child_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_job(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Send `sig` to torchrun and every process below it at once; wait until all are gone."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                             "zombie" not in _state(p) for p in pids[1:]), timeout=60)


def wait_job(job: subprocess.Popen, console=None, timeout: float = 120) -> None:
    """Wait for torchrun to exit within `timeout`; then kill what is left of the job, if
    anything, and let `console` (soak.Console, reading its output) finish."""
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            kill_job(job)
        if console is not None:
            console.join()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((l for l in f if l.startswith("State:")), "").lower()
    except OSError:
        return "zombie"


def wait_for(predicate, timeout: float = 120, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("timed out waiting for a condition")


def step_dir(ckpt: Path, step: int) -> Path:
    """The step dir of `step` under checkpoint dir `ckpt` (step_XXXXXXXX)."""
    return Path(ckpt) / f"step_{step:08d}"


def committed_steps(ckpt: Path) -> list[int]:
    """The steps of a local checkpoint dir whose step dir holds manifest.json, ascending."""
    return sorted(int(p.name[5:]) for p in Path(ckpt).glob("step_????????")
                  if (p / "manifest.json").exists())


def snapshot(root: Path) -> dict:
    """{relative path: (is a dir, size, mtime in ns)} of everything under root ({} if it is
    missing): equal before and after when nothing was written, renamed or touched."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} if root.exists() else {}


def error_lines(text: str) -> list[str]:
    """The `dcp_train: error:` lines of a job's output."""
    return [line for line in text.splitlines() if line.startswith("dcp_train: error:")]


def exit_codes(proc_or_text) -> dict[int, int]:
    """{rank: exit code} of the failed workers, from torchrun's failure report (a
    CompletedProcess's output, or the text)."""
    text = proc_or_text
    if isinstance(proc_or_text, subprocess.CompletedProcess):
        text = proc_or_text.stdout + proc_or_text.stderr
    return {int(r): int(c) for r, c in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)}


def metrics(log_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of log_dir/metrics.jsonl ([] if there is none); of one `kind` if given."""
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records if kind is None else of_kind(records, kind)


def losses(log_dir: Path) -> dict[int, float]:
    """step -> loss of the train records; a repeated step (after a resume) keeps the last."""
    return {r["step"]: r["loss"] for r in metrics(log_dir, "train")}


def digests(log_dir: Path) -> dict[int, str]:
    return {r["step"]: r["batch_digest"] for r in metrics(log_dir, "train")}


def load_checkpoint(step_dir: Path, tmp: Path) -> dict:
    """A DCP checkpoint as one flat dict of full tensors (dcp_train.tools.export.load_full_state)."""
    return load_full_state(step_dir, tmp)


def assert_same_tensors(a: dict, b: dict, prefixes=("model.", "optim.")) -> None:
    keys_a = {k for k in a if k.startswith(prefixes)}
    keys_b = {k for k in b if k.startswith(prefixes)}
    assert keys_a == keys_b and keys_a, (sorted(keys_a ^ keys_b))[:10]
    for k in sorted(keys_a):
        assert torch.equal(a[k], b[k]), f"{k} differs"


def rank_rng(sd: dict, rank: int) -> tuple[torch.Tensor, dict]:
    """(torch CPU generator state, numpy and Python generator states) in rank `rank`'s entry of
    a checkpoint loaded with load_checkpoint."""
    entry = json.loads(bytes(sd[f"rank_{rank:05d}.json"].tolist()))
    return sd[f"rank_{rank:05d}.torch_cpu"], entry["rng"]


def assert_same_run(run: Path, ref: Path, tmp: Path, steps: int, ranks: int = 2) -> None:
    """`run` (stopped, killed, restarted, ... and resumed) is its uninterrupted reference `ref`,
    bit for bit; both hold log/ and ckpt/ of a `ranks`-rank run of `steps` steps: every step's
    loss (==), the final checkpoint's model and optimizer tensors and every rank's generator
    states (torch.equal, ==). Rank 0's and rank 1's torch streams must differ from each other."""
    run_losses = losses(run / "log")
    assert sorted(run_losses) == list(range(1, steps + 1))
    assert run_losses == losses(ref / "log")  # floats compared with ==
    final = f"step_{steps:08d}"
    a, b = load_checkpoint(ref / "ckpt" / final, tmp), load_checkpoint(run / "ckpt" / final, tmp)
    assert_same_tensors(a, b)
    for rank in range(ranks):
        (ta, pa), (tb, pb) = rank_rng(a, rank), rank_rng(b, rank)
        assert torch.equal(ta, tb) and pa == pb, f"rank {rank} RNG differs"
    if ranks > 1:
        assert not torch.equal(rank_rng(b, 0)[0], rank_rng(b, 1)[0])


def one_error(proc) -> str:
    """The run failed with a single `dcp_train: error:` line, said once for the whole job
    (docs/errors.md)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dcp_train: error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def tree_bytes(root: Path) -> dict:
    """{relative path: content} of every file under root ('<dir>' for a dir): to assert that a
    directory is byte for byte unchanged."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>")
            for p in sorted(Path(root).rglob("*"))}


@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real tmpfs of `size` at `path` (mount(8) as root); skips the test otherwise."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    opts = ",".join([f"size={size}", *options])
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ---------------------------------------------------------------- object store (S3)
LATEST = "latest"


def s3fs_of(s3):
    import fsspec

    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.invalidate_cache()
    return fs


def listing(fs, path: str) -> list[str]:
    """Names directly under bucket path `path` (fresh, no listing cache)."""
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True))
    except FileNotFoundError:
        return []


def committed(fs, path: str) -> dict[str, dict[str, int]]:
    """{step dir: {file: size}} of the committed step dirs (with manifest.json) under path."""
    out = {}
    for name in listing(fs, path):
        if re.fullmatch(r"step_\d{8}", name) and fs.exists(f"{path}/{name}/manifest.json"):
            found = fs.find(f"{path}/{name}", detail=True)
            out[name] = {f.rsplit("/", 1)[-1]: info["size"] for f, info in found.items()}
    return out


def read_latest(fs, path: str) -> str | None:
    try:
        return fs.cat_file(f"{path}/{LATEST}").decode().strip()
    except FileNotFoundError:
        return None


def download_step(fs, url: str, dest: Path, tmp: Path) -> dict:
    """A remote step dir as a flat dict of full tensors (downloaded, then dcp_to_torch_save)."""
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(url.rstrip("/") + "/", str(dest) + "/", recursive=True)
    return load_checkpoint(dest, tmp)
