"""--wandb: the metrics.jsonl records, also as a Weights & Biases run (rank 0 only).

    sink = WandbSink(project, log_dir)    # (config.validate checked that wandb is installed)
    sink.log("config", **fields)            # buffered until start()
    sink.start(run_id)                      # after the resume decision: the run's own id
    sink.log("train", step=5, loss=...)     # -> {"step": 5, "train/loss": ...}
    sink.close()

What goes there, record by record (the same records as metrics.jsonl, docs/design.md
"Metrics"): the `config` record becomes the wandb run's config (credentials already
redacted); every other record is one `wandb.log` call with the fields as `<kind>/<field>`
(nested values as JSON text) and `step` as the x axis (`define_metric("*",
step_metric="step")`), so a resumed run that repeats steps after a crash adds points at those
steps instead of being dropped by wandb's own step counter. `resume` and `checkpoint` records
are there like `train` and `val`.

One run across restarts: the wandb run id is the checkpoint's `wandb_id` (checkpoint/state.Progress,
made at step 0 and saved in every checkpoint), and `wandb.init(id=..., resume="allow")`
continues that run on every resume, at any world size. Records logged before the resume
decision (the `config` record) are held back until start(). wandb sees the command line with
credentials redacted (it stores it in the run's metadata). wandb's console capture is off:
stdout stays the trainer's, and log files stay as without --wandb. WANDB_MODE=offline writes
the run under `<log_dir>/wandb` (or $WANDB_DIR) for a later `wandb sync`.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from dcp_train import redact


class WandbSink:
    def __init__(self, project: str, log_dir: str):
        import wandb

        self._wandb = wandb
        self.project, self.log_dir = project, log_dir
        self._run = None
        self._pending: list[tuple[str, dict]] = []

    def start(self, run_id: str) -> None:
        """Open (or continue) the wandb run `run_id` and send what was logged before."""
        os.makedirs(self.log_dir, exist_ok=True)
        with _scrubbed_argv():
            self._run = self._wandb.init(
                project=self.project, id=run_id, resume="allow",
                dir=os.environ.get("WANDB_DIR") or self.log_dir,
                settings=self._wandb.Settings(console="off"))
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        pending, self._pending = self._pending, []
        for kind, fields in pending:
            self.log(kind, **fields)

    def log(self, kind: str, **fields) -> None:
        if self._run is None:
            self._pending.append((kind, fields))
        elif kind == "config":
            self._run.config.update(json.loads(redact.scrub(json.dumps(fields))),
                                    allow_val_change=True)
        else:
            row = {f"{kind}/{k}": _plain(v) for k, v in fields.items() if k != "step"}
            if "step" in fields:
                row["step"] = fields["step"]
            self._run.log(json.loads(redact.scrub(json.dumps(row))))

    def close(self) -> None:
        if self._run is not None:
            with _scrubbed_argv():
                self._run.finish()
            self._run = None


@contextmanager
def _scrubbed_argv():
    """wandb stores the command line (sys.argv) in the run's metadata: let it see the
    redacted one, so a credential in --storage_options never reaches the run files."""
    argv = sys.argv
    sys.argv = [redact.scrub(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


def _plain(value):
    """A number, string or bool as is; anything else (dicts, lists, None) as JSON text."""
    if isinstance(value, (int, float, str, bool)):
        return value
    return json.dumps(value)
