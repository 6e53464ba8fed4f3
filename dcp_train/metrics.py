"""metrics.jsonl (DESIGN.md, "Metrics") and the console line, written by rank 0 only.

One JSON object per line, appended and flushed per record. Floats go through json's float
repr, which is Python's `repr`: the full precision, so two runs compare bit for bit.
"""

from __future__ import annotations

import json
import os
import sys


class Metrics:
    def __init__(self, log_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._file = None
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
        self._file.flush()

    def say(self, text: str) -> None:
        """A human-readable console line (rank 0)."""
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
