"""Checkpoints newer than the step a run resumes from (docs/design.md, "Starting and resuming").

A run resumed from step s writes s+1, s+2, ... into its checkpoint dirs. If a dir already holds
committed steps newer than s, those saves would replace them one by one, and discovery would
mix two runs. This happens with `--resume --checkpoint_path .../step_s` in a dir whose newest
step is later: such a start is refused, before anything is written, in one line naming the
newer steps and the two ways on: another --checkpoint_dir (the old run stays whole), or
--drop_newer_checkpoints.

--auto_resume is not this case: it continues from `latest`, the run's own newest step, and a
committed dir past `latest` is the same run's save that was killed between its commit and the
write of `latest` (docs/design.md, "Checkpoint directory"): the resumed run retrains that step
and its save replaces the dir, as it always did. Nor is discovery passing over a damaged
`latest`: the newer dirs it passed are damaged, and saves replace them as before
(layout.find_latest says so in its note).

With --drop_newer_checkpoints the newer steps are deleted at this run's first save, just before
it writes, not at the start: a run that stops before its first save (a refusal found late, a
crash in the first steps) leaves the old run whole. The drop first points `latest` at the
newest step that stays (or removes it when none stays), then deletes the newer step dirs,
newest first, each manifest first (protocol.Checkpointer.remove): a crash midway leaves a
`latest` older than the newer dirs left, and a relaunch is refused again, never mixed.
"""

from __future__ import annotations

from typing import Optional

from dcp_train import distributed as D
from dcp_train.checkpoint.io.names import LATEST, MANIFEST, STEP_RE, step_name
from dcp_train.checkpoint.layout import CheckpointDir, Found
from dcp_train.checkpoint.ride_out import agreed_phase
from dcp_train.errors import ConfigError

FLAG = "--drop_newer_checkpoints"


def pick(directory: CheckpointDir, ck, say) -> Optional[Found]:
    """Rank 0, the resume decision of --resume (ck.checkpoint_path) or --auto_resume: the
    checkpoint (layout.py), with `newer` set to the committed steps of `directory`
    (--checkpoint_dir) newer than it; ConfigError naming them unless
    ck.drop_newer_checkpoints. A fall-back of discovery (found.note) passed damaged dirs
    only: nothing is refused then."""
    if not ck.resume:  # `latest` is this run's own newest step (the module docstring)
        return directory.find_latest(defer=True)
    found = directory.open(ck.checkpoint_path, defer=True)
    if found is None or found.note:
        return found
    drop = ck.drop_newer_checkpoints
    found.newer = tuple(check(committed_after(directory, found.step), found.step,
                              "--checkpoint_dir", directory.root, drop))
    if found.newer:
        say(f"{FLAG}: steps {steps_text(found.newer)} of {directory.root} will be deleted at "
            f"this run's first save (resuming from step {found.step})")
    return found


def check_local(root: str, usable: list, step: int, drop: bool) -> list[int]:
    """Every rank: the local tier's steps newer than `step` (usable: every rank's
    LocalTier.usable()); ConfigError naming them unless `drop`."""
    return check({s for u in usable for s in u}, step, "--local_checkpoint_dir", root, drop)


def check(committed, step: int, flag: str, root: str, drop: bool) -> list[int]:
    """The steps of `committed` newer than `step`, the step the run resumes from; ConfigError
    naming them and the two ways on unless `drop`."""
    newer = sorted(s for s in committed if s > step)
    if newer and not drop:
        raise ConfigError(
            f"{flag} {root} holds committed steps newer than step {step}, which this run "
            f"resumes from: {steps_text(newer)}; its saves would replace them. Use another "
            f"{flag} to keep them, or pass {FLAG} to delete them at this run's first save")
    return newer


def committed_after(directory: CheckpointDir, step: int) -> dict[int, str]:
    """{step: name} of the committed step dirs of `directory` newer than `step`: the last
    listing of it (or a new one) and a look for the manifest of each newer step dir (none
    when there is none: a resume of the newest step asks nothing more of the store)."""
    names = directory.names() if directory.seen is None else directory.seen
    steps = {int(m.group(1)): n for n in names if (m := STEP_RE.match(n))}
    return {s: n for s, n in steps.items() if s > step and directory.storage.exists(
        directory.storage.join(n, MANIFEST))}


def steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:8])
    return shown + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")


def drop(checkpointer, newer: list[int]) -> list[str]:
    """The committing rank of `checkpointer`'s dir (protocol.Checkpointer): delete the
    committed step dirs `newer`, after pointing `latest` at the newest step that stays (see
    the module docstring). Returns the names deleted."""
    committed, _ = checkpointer.dir.scan(fresh=True)
    stay = [s for s in committed if s not in newer]
    latest = checkpointer.storage.join(LATEST)
    if stay:
        checkpointer.storage.write_atomic(latest, (step_name(max(stay)) + "\n").encode())
    elif checkpointer.storage.exists(latest):
        checkpointer.storage.rm_file(latest)
    names = [committed[s] for s in sorted(newer, reverse=True) if s in committed]
    for name in names:
        checkpointer.remove(checkpointer.storage.join(name))
    return names


def drop_all(steps: dict, durable, local, patience, say) -> None:
    """Every rank, at the first save of a run resumed with --drop_newer_checkpoints
    (CheckpointManager.save): the newer steps of both tiers (steps: {"durable": [...],
    "local": [...]}, Resume.newer) deleted (`drop`), and said. durable: the durable tier's
    Checkpointer; local: the LocalTier or None; patience: the store outage's ride-out
    (ride_out.py)."""
    if steps.get("durable"):
        root = durable.dir.root
        names = agreed_phase(lambda: drop(durable, list(steps["durable"])), patience, root,
                             "the drop of the newer checkpoints")
        say(f"{FLAG}: deleted {', '.join(names)} from {root}")
    if steps.get("local"):
        D.agree(lambda: drop(local.checkpointer, steps["local"]) if local.leader else [],
                every_rank=True)
        say(f"{FLAG}: deleted local steps {steps_text(steps['local'])} from {local.root}")
