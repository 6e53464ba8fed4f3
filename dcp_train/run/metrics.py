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
                 wandb_project: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        self._wandb = None
        if enabled and wandb_project is not None:
            from dcp_train.run.wandb_log import WandbSink
            self._wandb = WandbSink(wandb_project, log_dir)
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from dcp_train.errors import ConfigError
                raise ConfigError("--tensorboard needs the tensorboard package: "
                                  "pip install 'dcp_train[tensorboard]'") from None
            self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))

    def log(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **fields, "time": time.time()}
        self._file.write(redact.scrub(json.dumps(record)) + "\n")
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
        """The run's id is known (the checkpoint's, or a new one at step 0): open the wandb
        run of --wandb under it. Nothing without --wandb."""
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
