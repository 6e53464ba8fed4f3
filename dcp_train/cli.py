"""The command line, built from the config dataclasses (config.py).

Every field of every section is one flag of the same name (`--checkpoint_dir` sets
`cfg.checkpoint.checkpoint_dir`), shown by `--help` with its help line and default, grouped by
section. Model dimensions default to the chosen `--preset` and an explicit dimension flag
overrides it; some run settings have per-preset defaults too (config.PRESET_RUN_DEFAULTS).
No prefix abbreviations (`--max_step` is an error, not `--max_steps`).

Parsing never touches torch.distributed, so `--help` and flag errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from typing import Optional

from dcp_train.config import PRESETS, PRESET_RUN_DEFAULTS, SECTIONS, Config, ModelConfig, validate
from dcp_train.errors import ConfigError
from dcp_train.run import redact

PRESET_RUN_DEFAULTS_KEYS = {k for d in PRESET_RUN_DEFAULTS.values() for k in d}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _auto_bool(text: str) -> Optional[bool]:
    return None if text.lower() == "auto" else _bool(text)


def _add_fields(parser, cls, defaults_from_preset: bool) -> None:
    """One flag per field of `cls` (section fields of Config are skipped)."""
    for f in fields(cls):
        if f.name in SECTIONS:
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _bool,
               "Optional[int]": int, "Optional[bool]": _auto_bool}[str(f.type)]
        by_preset = {p: d[f.name] for p, d in PRESET_RUN_DEFAULTS.items() if f.name in d}
        help_text = f.metadata["help"]
        if defaults_from_preset:
            parser.add_argument(f"--{f.name}", type=typ, default=None,
                                help=f"{help_text} (default: from --preset)")
        elif by_preset:
            note = ", ".join(f"--preset {p}: {v}" for p, v in by_preset.items())
            parser.add_argument(f"--{f.name}", type=typ, default=None,
                                help=f"{help_text} (default: {f.default}; {note})")
        elif typ is _bool:
            parser.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True,
                                default=f.default, help=f"{help_text} (default: %(default)s)")
        elif typ is _auto_bool:
            parser.add_argument(f"--{f.name}", type=_auto_bool, nargs="?", const=True,
                                default=f.default, help=f"{help_text} (default: auto)")
        else:
            own = "(default:" in help_text  # the help says it (--seq_len)
            parser.add_argument(f"--{f.name}", type=typ, default=f.default,
                                help=help_text + ("" if own else " (default: %(default)s)"))


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argparse parser: a group per config section."""
    parser = argparse.ArgumentParser(
        prog="dcp_train.main", allow_abbrev=False,  # --max_step must not mean --max_steps
        description="GPT-2 pre-training with FSDP2 and DCP checkpoints. "
                    "Launch: torchrun --nproc_per_node=N -m dcp_train.main [flags]")
    _add_fields(parser.add_argument_group("run"), Config, defaults_from_preset=False)
    for name, cls in SECTIONS.items():
        if name == "model":
            _add_fields(parser.add_argument_group("model (override --preset)"), cls,
                        defaults_from_preset=True)
        else:
            _add_fields(parser.add_argument_group(name), cls, defaults_from_preset=False)
    return parser


def parse_config(argv: Optional[list[str]] = None) -> Config:
    """Flags -> validated Config. Raises ConfigError (argparse's own errors exit 2)."""
    args = vars(build_parser().parse_args(argv))
    preset = args["preset"]
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    model = dataclasses.replace(PRESETS[preset], **{
        f.name: args[f.name] for f in fields(ModelConfig) if args[f.name] is not None})
    preset_defaults = PRESET_RUN_DEFAULTS[preset]

    def value(f: dataclasses.Field):
        if args[f.name] is None and f.name in PRESET_RUN_DEFAULTS_KEYS:
            return preset_defaults.get(f.name, f.default)
        return args[f.name]

    sections = {name: cls(**{f.name: value(f) for f in fields(cls)})
                for name, cls in SECTIONS.items() if name != "model"}
    cfg = Config(preset=preset, model=model, storage_options=args["storage_options"],
                 **sections)
    validate(cfg)
    redact.remember(cfg.storage_options_dict)  # scrubbed from every line printed or stored
    return cfg
