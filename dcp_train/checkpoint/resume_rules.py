"""The resume rules: what a resume may change, and what it may not (docs/design.md,
"Starting and resuming"). `check_resume(meta, path, cfg, fingerprint)` applies all of them
to a checkpoint's stored meta and returns the accepted changes, or raises:

1. the format: a checkpoint whose `format_version` is newer than this code reads is a
   CheckpointError (`check_format`);
2. --deterministic cannot be switched on or off on resume, and in that mode --batch_size
   (which fixes the micro-batches whose bits the mode reproduces) cannot change
   (`check_deterministic`; ConfigError);
3. the run comparison below (`compare_run`): errors are one ConfigError line.

`compare_run(saved_config, saved_fingerprint, cfg, fingerprint)` compares the run stored in a
checkpoint with this launch's flags and returns (errors, changes):

- errors: one clause per setting that defines the data stream or the model, which a resume
  must keep at any world size: --seed, the data fingerprint (data/fingerprint.py), --seq_len,
  --total_batch_size, and the model dimensions (--block_size --vocab_size --n_layer --n_head
  --n_embd). `mismatch_message` makes the one error line of them.
- changes: {flag name: [saved value, new value]} for every other setting that differs (LR,
  schedule, weight decay, max_steps, dropout, intervals, micro-batch size, worker count,
  paths, ...): accepted, printed as one WARNING line each (`change_lines`) and recorded in
  the `resume` record. Storage options are compared redacted (a rotated key is no change).

Not compared: how and where this launch runs (--auto_resume, --resume, --checkpoint_path,
--checkpoint_dir, --local_checkpoint_dir, --log_dir, --stop_at_step, --init_from: a
resume never reads it). A
checkpoint written before fingerprints were stored (saved_fingerprint None) cannot be checked
for other data: changes then holds "data_fingerprint": [None, <digest>], for the caller to
warn about.
"""

from __future__ import annotations

import json

from dcp_train import redact
from dcp_train.checkpoint.state import FORMAT_VERSION
from dcp_train.config import Config, redacted_config
from dcp_train.data.fingerprint import fingerprint_diff
from dcp_train.errors import CheckpointError, ConfigError

STREAM = ("seed", "seq_len", "total_batch_size")
MODEL_DIMS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
# how and where this launch runs, not what the run is: a checkpoint dir copied elsewhere, a
# new log dir or another stop step is no change of the run
NOT_COMPARED = ("auto_resume", "resume", "checkpoint_path", "checkpoint_dir", "log_dir",
                "stop_at_step", "local_checkpoint_dir", "init_from")
_MISSING = object()


def check_resume(meta: dict, path: str, cfg: Config, fingerprint: dict) -> dict:
    """Every rule for continuing the run stored in checkpoint `path` (its `meta`) with this
    launch's `cfg` and data `fingerprint` (the module docstring). Returns the accepted
    changes {flag: [saved, now]}; raises CheckpointError (format) or ConfigError."""
    check_format(meta, path)
    check_deterministic(meta["config"], cfg)
    errors, changes = compare_run(meta["config"], meta.get("data_fingerprint"), cfg,
                                  fingerprint)
    if errors:
        raise ConfigError(mismatch_message(path, errors))
    return changes


def check_format(meta: dict, path: str) -> None:
    """A format this code reads (checkpoints before format_version was stored are format 1)."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, newer than this "
                              f"dcp_train reads ({FORMAT_VERSION}); resume it with the "
                              "dcp_train version that wrote it, or upgrade")


def check_deterministic(saved_config: dict, cfg: Config) -> None:
    """--deterministic cannot be switched on or off on resume, and in the mode --batch_size
    (which fixes the decomposition, train/deterministic.py) cannot change."""
    saved = bool(saved_config.get("deterministic", False))
    if saved != cfg.training.deterministic:
        raise ConfigError(f"the checkpoint was written {'with' if saved else 'without'} "
                          f"--deterministic; resume it {'with' if saved else 'without'} the "
                          "flag, or start a new run in another --checkpoint_dir")
    if saved and saved_config["batch_size"] != cfg.training.batch_size:
        raise ConfigError(f"the checkpoint was written with --deterministic --batch_size "
                          f"{saved_config['batch_size']}; keep that --batch_size (it fixes the "
                          "micro-batches whose bits the mode reproduces)")


def _flat(config: dict) -> dict:
    """A config dict (Config as dict, model nested) as {flag name: value}."""
    flat = {k: v for k, v in config.items() if k != "model"}
    flat.update(config.get("model") or {})
    return flat


def compare_run(saved_config: dict, saved_fingerprint: dict | None, cfg,
                fingerprint: dict) -> tuple[list[str], dict]:
    """(errors, changes) of resuming the saved run with `cfg` (see the module docstring).
    saved_config: the checkpoint's stored config (redacted, as config.redacted_config)."""
    old = _flat(redact.redact_config_dict(saved_config))
    new = _flat(redacted_config(cfg))
    errors = []
    for name in STREAM + MODEL_DIMS:
        before = old.get(name, _MISSING)
        if before is not _MISSING and before != new[name]:
            errors.append(f"--{name} {new[name]} (the saved run used {before})")
    if saved_fingerprint is not None:
        diff = fingerprint_diff(saved_fingerprint, fingerprint)
        if diff:
            errors.append(f"other training data in --data_dir {cfg.data.data_dir} "
                          f"({'; '.join(diff)})")
    changes = {}
    for name, value in new.items():
        if name in STREAM + MODEL_DIMS + NOT_COMPARED:
            continue
        before = old.get(name, _MISSING)
        if before is _MISSING:
            continue  # a setting newer than the checkpoint: nothing to compare with
        if name == "storage_options":
            before, value = _canonical(before), _canonical(value)
        if before != value:
            changes[name] = [before, value]
    if saved_fingerprint is None:
        changes["data_fingerprint"] = [None, fingerprint.get("digest")]
    return errors, changes


def _canonical(options_text):
    try:
        return json.dumps(json.loads(options_text), sort_keys=True)
    except (TypeError, ValueError):
        return options_text


def mismatch_message(path: str, errors: list[str]) -> str:
    """The one error line for a resume that would change the data stream or the model."""
    return (f"cannot resume {path} with these flags: {'; '.join(errors)}; the data order or "
            "the model would differ from the saved run's. Pass the saved values to continue "
            "it, or start a new run in another --checkpoint_dir")


def change_lines(changes: dict) -> list[str]:
    """One WARNING line per accepted change (what the console shows on a resume)."""
    lines = []
    for name, (before, after) in changes.items():
        if name == "data_fingerprint":
            lines.append("WARNING: the checkpoint holds no data fingerprint (written by older "
                         "code): the training data could not be checked")
        else:
            lines.append(f"WARNING: --{name} changed on resume: {before!r} -> {after!r}")
    return lines


def end_note(step: int, max_steps: int) -> str | None:
    """The line for a checkpoint at or past --max_steps (nothing left to train), else None."""
    if step < max_steps:
        return None
    return (f"checkpoint is at step {step} and --max_steps is {max_steps}: nothing to train; "
            "pass a larger --max_steps to extend the run (see --lr_schedule)")

