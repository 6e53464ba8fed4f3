"""The command line, built from the config dataclasses (config.py).

Every field of every section is one flag of the same name (`--checkpoint_dir` sets
`cfg.checkpoint.checkpoint_dir`), shown by `--help` with its help line and default, grouped by
section. Model dimensions default to the chosen `--preset` and an explicit dimension flag
overrides it; some run settings have per-preset defaults too (config.PRESET_RUN_DEFAULTS).
No prefix abbreviations (`--max_step` is an error, not `--max_steps`).

`--config FILE.toml`: a TOML file whose tables are the sections (`[model]`, `[training]`,
`[data]`, `[eval]`, `[logging]`, `[hardware]`, `[checkpoint]`; `preset` and `storage_options` at
the top) sets the flags' values; a flag given on the command line overrides the file. A key
that is no flag of its table, or a value of the wrong type, is one ConfigError naming the key
and the file. Values from the file count as given explicitly (a dimension in `[model]`
overrides the preset, as the flag would). configs/*.toml are the presets written out.

Parsing never touches torch.distributed, so `--help` and flag errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import fields
from typing import Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from dcp_train import redact
from dcp_train.config import PRESETS, PRESET_RUN_DEFAULTS, SECTIONS, Config, ModelConfig, validate
from dcp_train.errors import ConfigError
from dcp_train.train.hf_config import hf_model_dims

PRESET_RUN_DEFAULTS_KEYS = {k for d in PRESET_RUN_DEFAULTS.values() for k in d}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _auto_bool(text: str) -> Optional[bool]:
    if text.lower() == "auto":
        return None
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


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


class _Parser(argparse.ArgumentParser):
    """argparse's errors (a bad type, an unknown flag) as one ConfigError line naming the
    flag, without the usage block: main() prints it like every other bad flag."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argparse parser: a group per config section."""
    parser = _Parser(
        prog="dcp_train.main", allow_abbrev=False,  # --max_step must not mean --max_steps
        description="GPT-2 pre-training with FSDP2 and DCP checkpoints. "
                    "Launch: torchrun --nproc_per_node=N -m dcp_train.main [flags]")
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE.toml", default=None,
                     help="TOML file of flag values in tables named like the groups below "
                          "([model], [training], [checkpoint], ...; see configs/); flags on "
                          "the command line override it (default: none)")
    _add_fields(run, Config, defaults_from_preset=False)
    for name, cls in SECTIONS.items():
        if name == "model":
            _add_fields(parser.add_argument_group("model (override --preset)"), cls,
                        defaults_from_preset=True)
        else:
            _add_fields(parser.add_argument_group(name), cls, defaults_from_preset=False)
    return parser


_TYPES = {  # field type -> (accepts, what the error says)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "Optional[int]": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "Optional[bool]": (lambda v: isinstance(v, bool) or v == "auto", 'true, false or "auto"'),
}


def load_config_file(path: str) -> dict:
    """{flag name: value} of the TOML file `path` (see the module doc); ConfigError naming
    the file and the key for anything that is not a flag of its table or has the wrong type."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror}); give the path of "
                          "a TOML file (examples in configs/)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    top = {f.name: f for f in fields(Config) if f.name not in SECTIONS}
    values = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            known = {f.name: f for f in fields(SECTIONS[key])}
            for name, v in value.items():
                if name not in known:
                    raise ConfigError(f"--config {path}: unknown key {name!r} in [{key}]; its "
                                      f"keys are {', '.join(known)}")
                values[name] = _typed(path, f"[{key}] {name}", known[name], v)
        elif key in top:
            values[key] = _typed(path, key, top[key], value)
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r}; a config file has the "
                              f"tables {', '.join(f'[{s}]' for s in SECTIONS)} and the keys "
                              f"{', '.join(top)}")
    return values


def _typed(path: str, where: str, f: dataclasses.Field, value):
    """`value` of field `f` from the file, checked and converted as the flag would be."""
    if f.name == "storage_options" and isinstance(value, dict):
        value = json.dumps(value)  # a TOML table of fsspec options
    accepts, words = _TYPES[str(f.type)]
    if not accepts(value):
        shown = "a TOML " + type(value).__name__ if f.name == "storage_options" else repr(value)
        raise ConfigError(f"--config {path}: {where} must be {words}, got {shown}")
    if str(f.type) == "float":
        return float(value)
    if str(f.type) == "Optional[bool]" and value == "auto":
        return None
    return value


def init_from_dims(url: str, storage_options: str, explicit: dict) -> dict:
    """The model dimensions of --init_from's config.json; ConfigError if a dimension flag
    given on the command line (`explicit`) differs from it."""
    try:
        options = json.loads(storage_options)
    except ValueError:
        options = None  # validate() reports the bad JSON
    dims = hf_model_dims(url, options if isinstance(options, dict) else {})
    clash = [f"--{k} {explicit[k]} (its config.json: {v})" for k, v in dims.items()
             if k in explicit and explicit[k] != v]
    if clash:
        raise ConfigError(f"--init_from {url} does not fit {'; '.join(clash)}; drop these "
                          "flags: the model dimensions come from its config.json")
    return dims


def parse_config(argv: Optional[list[str]] = None) -> Config:
    """Flags -> validated Config. Raises ConfigError, argparse's own errors included."""
    parser = build_parser()
    config_flag = _Parser(add_help=False, allow_abbrev=False)
    config_flag.add_argument("--config", default=None)
    config_file = config_flag.parse_known_args(argv)[0].config
    if config_file is not None and not config_file.strip():
        raise ConfigError("--config is empty; give the path of a TOML file (examples in "
                          "configs/)")
    from_file = load_config_file(config_file) if config_file else {}
    parser.set_defaults(**from_file)
    args = vars(parser.parse_args(argv))
    preset = args["preset"]
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    explicit = {f.name: args[f.name] for f in fields(ModelConfig) if args[f.name] is not None}
    model = dataclasses.replace(PRESETS[preset], **explicit)
    if args["init_from"]:  # the dimensions come from its config.json
        model = dataclasses.replace(model, **init_from_dims(
            args["init_from"], args["storage_options"], explicit))
    preset_defaults = PRESET_RUN_DEFAULTS[preset]

    def value(f: dataclasses.Field):
        if args[f.name] is None and f.name in PRESET_RUN_DEFAULTS_KEYS:
            return preset_defaults.get(f.name, f.default)
        return args[f.name]

    sections = {name: cls(**{f.name: value(f) for f in fields(cls)})
                for name, cls in SECTIONS.items() if name != "model"}
    cfg = Config(preset=preset, model=model, storage_options=args["storage_options"],
                 **sections)
    try:
        validate(cfg)
    except ConfigError as e:
        raise in_file(e, config_file, from_file, sys.argv[1:] if argv is None else argv) from None
    redact.remember(cfg.storage_options_dict)  # scrubbed from every line printed or stored
    return cfg


def in_file(error: ConfigError, path: Optional[str], from_file: dict,
            argv: list[str]) -> ConfigError:
    """`error` of a check that names its flag first (`--stall_timeout must be ...`), said of
    the TOML file's key when the value came from the file (not overridden by the flag)."""
    flag = (error.args[0].split() or [""])[0].removeprefix("--")
    given = any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv)
    if flag not in from_file or given:
        return error
    section = next((f"[{name}] " for name, cls in SECTIONS.items()
                    if flag in {f.name for f in fields(cls)}), "")
    text = error.args[0].removeprefix(f"--{flag}").replace(
        "; quote the JSON object for your shell",
        "; write a TOML table (storage_options = {key = \"value\"}) or a JSON object as a "
        "TOML string")
    return ConfigError(f"--config {path}: {section}{flag}{text}")
