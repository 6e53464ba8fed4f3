"""The names in a checkpoint directory, in one place (docs/design.md, "Checkpoint directory")::

    latest                       one line: the name of the newest committed step dir
    writer.lease                 which run writes here (lease.py)
    step_00000020/               committed: DCP files + manifest.json
      .metadata                  DCP's small index file, read before any shard
      manifest.json              size and checksum of every file: the commit point
      tier.json                  local tier only (tiers/local.py): not part of the checkpoint
    step_00000025.tmp-<id>/      a save in progress, or abandoned by a crash (local dirs)
    .latest.tmp-<8 hex>          a temp file of the atomic write, abandoned by a crash
                                 (TEMP_RE, the store layer's: store/atomic.py)

A step comes from its dir's name (an anchored pattern), never from file times.
"""

from __future__ import annotations

import re

from dcp_train.store.atomic import TEMP_RE

LATEST = "latest"
LEASE = "writer.lease"
MANIFEST = "manifest.json"
METADATA = ".metadata"
TIER = "tier.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_RE = re.compile(r"^step_(\d{8})\.tmp-[0-9a-z]+$")

__all__ = ["LATEST", "LEASE", "MANIFEST", "METADATA", "TIER", "STEP_RE", "TMP_RE", "TEMP_RE",
           "step_name"]


def step_name(step: int) -> str:
    """The name of step `step`'s dir: step_XXXXXXXX."""
    return f"step_{step:08d}"
