"""Progress bars (dcp_train/job/progress.py): shown at an interactive terminal, never in a log.

A real pseudo-terminal (pty) stands for the user's terminal; a pipe for a log file, a batch
system or `| tee`. Checked:
- data preparation at a terminal shows its `tokenizing` bar; piped, the same command writes
  no bar (no carriage return, no bar text) and the same shards;
- a 2-rank training run with a HellaSwag evaluation and a resume: piped, its output holds no
  bar; at a terminal, the HellaSwag bar is there;
- the bytes bar of a bucket download counts what the process really receives (a real 6 MiB
  read, at a pty);
- `bar` on any rank but 0, or with DCP_TRAIN_PROGRESS=0, is disabled.

Run: .venv/bin/python -m pytest tests/test_progress.py -q
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios

from dcp_train.job.progress import bar, received_bytes
from helpers import REPO, TINY, child_env, torchrun_cmd, write_shards

EXAMPLE = {"ctx": "The dog runs to the door and", "label": 0,
           "endings": ["barks at the mailman.", "sings.", "opens a bank account.", "flies."]}


def terminal() -> tuple[int, int]:
    """A new pty (master, slave) of 24 x 120 characters, like a terminal window."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return master, slave


def run_at_terminal(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a new pty; (exit code, everything it wrote)."""
    master, slave = terminal()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            assert ready, "no output within the timeout"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the pty is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        code = proc.wait(timeout=60)
    return code, out.decode(errors="replace")


def prepare_cmd(tmp_path, out: str) -> list[str]:
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 2000)
    return [sys.executable, "-m", "dcp_train.data.prepare", "--source", "text", "--inputs",
            str(text), "--out", str(tmp_path / out)]


def test_data_preparation(tmp_path):
    code, shown = run_at_terminal(prepare_cmd(tmp_path, "tty"), {})
    assert code == 0 and "tokenizing" in shown and "\r" in shown, shown
    piped = subprocess.run(prepare_cmd(tmp_path, "pipe"), cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "tokenizing" not in piped.stderr + piped.stdout
    assert "\r" not in piped.stderr + piped.stdout
    for name in os.listdir(tmp_path / "tty"):
        assert (tmp_path / "tty" / name).read_bytes() == (tmp_path / "pipe" / name).read_bytes()


def test_training_run(tmp_path):
    data = write_shards(tmp_path / "data")
    hellaswag = tmp_path / "hellaswag_val.jsonl"
    hellaswag.write_text("\n".join(json.dumps(EXAMPLE) for _ in range(6)) + "\n")
    args = TINY + ["--vocab_size", "50304", "--batch_size", "4", "--total_batch_size", "256",
                   "--max_steps", "4", "--checkpoint_interval", "2", "--data_dir", str(data),
                   "--hellaswag_interval", "4", "--hellaswag_path", str(hellaswag)]

    def dirs(name):
        return ["--log_dir", str(tmp_path / name / "log"),
                "--checkpoint_dir", str(tmp_path / name / "ckpt")]

    first = subprocess.run(torchrun_cmd(2, args + dirs("pipe") + ["--stop_at_step", "2"]),
                           cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    resumed = subprocess.run(torchrun_cmd(2, args + dirs("pipe") + ["--auto_resume"]),
                             cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=300)
    for proc in (first, resumed):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "\r" not in proc.stdout + proc.stderr
    assert "HellaSwag acc_norm" in resumed.stdout and "HellaSwag (" not in resumed.stderr
    code, shown = run_at_terminal(torchrun_cmd(2, args + dirs("tty")), {})
    assert code == 0, shown[-3000:]
    assert "HellaSwag (6 examples)" in shown and "\r" in shown


def test_download_bar_counts_received_bytes(tmp_path, monkeypatch):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(6 << 20))
    master, slave = terminal()
    with os.fdopen(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        with received_bytes("checkpoint download", total=6 << 20, interval=0.01):
            with open(blob, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
        tty.flush()
    shown = b""
    while select.select([master], [], [], 0.5)[0]:  # everything the bar wrote
        try:
            shown += os.read(master, 1 << 16)
        except OSError:  # EIO: read to the end (the slave side is closed)
            break
    shown = shown.decode(errors="replace")
    os.close(master)
    assert "checkpoint download" in shown and "6.00M/6.00M" in shown, shown


def test_off_on_other_ranks_and_by_variable(monkeypatch):
    assert bar(desc="x", rank=1).disable
    monkeypatch.setenv("DCP_TRAIN_PROGRESS", "0")
    assert bar(desc="x", rank=0).disable
