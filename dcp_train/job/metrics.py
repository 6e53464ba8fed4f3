"""metrics.jsonl (docs/design.md, "Metrics") and the console line, written by rank 0 only.

One JSON object per line, appended and flushed per record. Floats go through json's float
repr, which is Python's `repr`: the full precision, so two runs compare bit for bit. Every
record carries `time`, the Unix time (seconds, a float: time.time()) at which it was logged,
so that wall-clock figures (goodput, the seconds from a failure to the next step) can be
computed from the log; it is the one field two identical runs never share, so comparisons of
runs name the fields they compare (tests/helpers.py: losses, digests), never `time`.

With `tensorboard=True` (--tensorboard) every numeric field of a record except `step` also
goes to a SummaryWriter in <log_dir>/tensorboard as scalar "<kind>/<field>" at that step
(needs the optional `tensorboard` package; imported only then).

With `wandb_project` (--wandb) every record also goes to a Weights & Biases run
(wandb_log.py); `start_run(id)`, called once the run's id is known (after the resume
decision), opens it and sends what was logged before.

With `hold=True` (the trainer) nothing is created before `start_run`: records are held in
memory and the log dir, metrics.jsonl and the TensorBoard files are made there, so a start
refused before it (a flag, --init_from, a resume check) leaves nothing in the log dir.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from dcp_train import redact
from dcp_train.config import redacted_config


class Metrics:
    def __init__(self, log_dir: str, enabled: bool, tensorboard: bool = False,
                 wandb_project: str | None = None, hold: bool = False):
        self.enabled = enabled
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        self._tensorboard = None
        self._wandb = None
        self._held: list | None = [] if hold and enabled else None  # records before start_run
        if enabled and wandb_project is not None:
            from dcp_train.job.wandb_log import WandbSink
            self._wandb = WandbSink(wandb_project, log_dir)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from dcp_train.errors import ConfigError
                raise ConfigError("--tensorboard needs the tensorboard package: "
                                  "pip install 'dcp_train[tensorboard]'") from None
            self._tensorboard = SummaryWriter
        if enabled and not hold:
            self._open()

    def _open(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard is not None:
            self._tb = self._tensorboard(os.path.join(self.log_dir, "tensorboard"))

    def log(self, kind: str, **fields) -> None:
        if self.enabled:
            self._write(kind, fields, time.time())

    def _write(self, kind: str, fields: dict, when: float) -> None:
        """One record, `time` being `when` it was logged (held ones keep theirs)."""
        if self._held is not None:
            self._held.append((kind, fields, when))
            return
        self._file.write(redact.scrub(json.dumps({"kind": kind, **fields, "time": when})) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(kind, **fields)
        if self._tb is not None and "step" in fields:
            for name, value in fields.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, fields["step"])
            self._tb.flush()

    def say(self, text: str) -> None:
        """A human-readable console line (rank 0)."""
        if self.enabled:
            print(redact.scrub(text), file=sys.stdout, flush=True)

    def start_run(self, run_id: str) -> None:
        """The run's id is known (the checkpoint's, or a new one at step 0; after the resume
        decision): open the log files if held (hold=True) and write what was held, and
        the wandb run of --wandb under that id."""
        if self._held is not None:
            held, self._held = self._held, None
            self._open()
            for kind, fields, when in held:
                self._write(kind, fields, when)
        if self._wandb is not None:
            self._wandb.start(run_id)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def launch_record(cfg, world_size: int, device: str, setup_s: float | None = None) -> dict:
    """Fields of the `config` record written once at the start of every launch: the run's
    configuration (credentials redacted), world size, device, the versions that ran it, and
    `setup_s`, the seconds the process group's setup took (with the record's `time` and the
    process's start, a restart's startup splits into imports and process group)."""
    import torch

    import dcp_train
    return {"config": redacted_config(cfg), "world_size": world_size, "device": device,
            "torch": torch.__version__, "dcp_train": dcp_train.__version__,
            "python": platform.python_version(), "setup_s": setup_s}


def resident_mb() -> float | None:
    """This process's resident memory (VmRSS) in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def read_metrics(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def of_kind(records: list[dict], kind: str) -> list[dict]:
    """The records of one kind (`train`, `val`, `checkpoint`, `resume`, ...), in their order:
    how dcp-plot, the tests and the benchmarks pick records out of a metrics.jsonl."""
    return [r for r in records if r.get("kind") == kind]
