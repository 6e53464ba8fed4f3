"""Typed run configuration and the command line built from it.

Every flag is a dataclass field with a help line (`field(metadata={"help": ...})`), so
`--help` lists each one with its default. Model dimensions use nanoGPT's `GPTConfig` names and
default to the chosen `--preset`; an explicit dimension flag overrides the preset.

Parsing never touches torch.distributed, so `--help` and flag errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Optional

from dcp_train import redact


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    """GPT-2 dimensions (nanoGPT's GPTConfig)."""

    block_size: int = _help("maximum sequence length (positional embeddings)", default=1024)
    vocab_size: int = _help("vocabulary size; 50304 = GPT-2's 50257 padded to a multiple of 64",
                            default=50304)
    n_layer: int = _help("number of transformer blocks", default=12)
    n_head: int = _help("attention heads per block", default=12)
    n_embd: int = _help("embedding width", default=768)
    dropout: float = _help("dropout on embeddings, attention and residuals", default=0.0)


PRESETS = {
    "gpt2-124m": ModelConfig(),
    "tiny": ModelConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64),
}

# Run settings a preset changes (any explicit flag wins). gpt2-124m uses the field defaults,
# which are build-nanogpt's; tiny is sized for a CPU demo: 1024-token steps, a short warmup,
# frequent evaluations and checkpoints.
PRESET_RUN_DEFAULTS = {
    "gpt2-124m": {},
    "tiny": {"batch_size": 8, "total_batch_size": 1024, "warmup_steps": 10, "max_lr": 3e-3,
             "eval_interval": 25, "val_steps": 4, "generate_interval": 50,
             "hellaswag_interval": 50, "hellaswag_limit": 100, "checkpoint_interval": 25},
}


@dataclass
class Config:
    """One training run. Field names are the command-line flags."""

    # model
    preset: str = _help(f"model preset, one of {sorted(PRESETS)}; dimension flags override it",
                        default="gpt2-124m")
    model: ModelConfig = field(default_factory=ModelConfig)  # filled from preset + flags

    # schedule and batch
    max_steps: int = _help("number of optimizer updates to reach", default=19073)
    stop_at_step: int = _help("stop (with a checkpoint) after this step; the LR schedule still "
                              "runs to --max_steps (-1: off)", default=-1)
    warmup_steps: int = _help("linear warmup steps of the learning rate", default=715)
    max_lr: float = _help("peak learning rate; cosine decays it to 10%% of this", default=6e-4)
    lr_schedule: str = _help(
        "on a resume with another --max_steps: 'continue' keeps the saved run's cosine (it "
        "ends at the saved max_steps, then the LR stays at its final 10%%), so the LR never "
        "jumps and the steps both runs share see the same LR; 'recompute' fits the cosine to "
        "the new --max_steps (the LR jumps back up when a finished run is extended)",
        default="continue")
    weight_decay: float = _help("AdamW weight decay on 2-D parameters", default=0.1)
    grad_clip: float = _help("clip the global gradient norm to this", default=1.0)
    batch_size: int = _help("micro-batch size per rank (sequences)", default=64)
    seq_len: Optional[int] = _help("tokens per sequence (default: --block_size)", default=None)
    total_batch_size: int = _help("tokens per optimizer step, over all ranks and micro-steps",
                                  default=524288)
    seed: int = _help("seed of model init, data order and per-rank RNG streams", default=1337)
    deterministic: bool = _help("bit-identical losses and state on every world size that "
                                "divides the step's micro-batches (total_batch_size/seq_len/"
                                "batch_size), and across resumes at any of them; slower, see "
                                "README", default=False)

    # data
    data_dir: str = _help("folder or fsspec URL with *_train_*.npy / *_val_*.npy uint16 token "
                          "shards (URLs are cached under $DCP_TRAIN_CACHE_DIR); the default "
                          "folder gets the embedded corpus on first use", default="data/default")
    num_workers: int = _help("data loader worker processes per rank", default=0)

    # evaluation
    eval_interval: int = _help("val loss every N steps (0 or -1: off)", default=250)
    val_steps: int = _help("micro-batches per rank for one val loss", default=20)
    hellaswag_interval: int = _help("HellaSwag every N steps (0 or -1: off)", default=250)
    hellaswag_path: str = _help("local HellaSwag val jsonl (see python -m dcp_train.hellaswag)",
                                default="data/hellaswag/hellaswag_val.jsonl")
    hellaswag_limit: int = _help("score at most N HellaSwag examples (-1: all)", default=-1)
    generate_interval: int = _help("text samples every N steps (0 or -1: off)", default=250)
    prompt: str = _help("prompt of the text samples", default="Hello, I'm a language model,")
    tokenizer_file: str = _help("local tiktoken BPE file (r50k_base/gpt2 ranks) for machines "
                                "without internet; default: tiktoken's own download/cache",
                                default="")

    # logging and devices
    log_dir: str = _help("where metrics.jsonl goes", default="log")
    tensorboard: bool = _help("also write the metrics as TensorBoard scalars to "
                              "<log_dir>/tensorboard (needs the tensorboard package)",
                              default=False)
    device: str = _help("auto, cpu or cuda", default="auto")
    compile: Optional[bool] = _help("torch.compile each transformer block: true, false or auto "
                                    "(on for CUDA, off for CPU)", default=None)
    peak_tflops: float = _help("peak TFLOP/s of one device for MFU (0: the GPU's dense bf16 "
                               "peak by name on CUDA; on CPU mfu stays null)", default=0.0)

    # checkpoints
    checkpoint_dir: str = _help("checkpoint folder: local path or fsspec URL (s3://, gs://, ...)",
                                default="checkpoints")
    checkpoint_interval: int = _help("save every N steps (and always at the last step; 0: "
                                     "only the last)", default=5000)
    checkpoint_interval_minutes: float = _help("also save when M minutes have passed since "
                                               "the last save (0: off)", default=0.0)
    local_checkpoint_dir: str = _help("node-local dir of the local tier ({node}: the node rank); "
                                      "saves go here first, then to --checkpoint_dir", default="")
    local_checkpoint_interval: int = _help("save on the local tier every N steps (0: off)",
                                           default=0)
    local_checkpoint_interval_minutes: float = _help("also save locally every M minutes (0: off)",
                                                     default=0.0)
    keep_last_n_local_checkpoints: int = _help("keep the N newest local checkpoints (-1: all)",
                                               default=2)
    keep_last_n_checkpoints: int = _help("keep the N newest committed checkpoints (-1: all)",
                                         default=-1)
    auto_resume: bool = _help("resume from the newest committed checkpoint, if there is one",
                              default=False)
    resume: bool = _help("resume from --checkpoint_path (an error if it is not a checkpoint)",
                         default=False)
    checkpoint_path: str = _help("checkpoint step dir to resume from, with --resume", default="")
    async_checkpoint: bool = _help("write checkpoints in the background (dcp.async_save "
                                   "style): the loop only waits for a copy of the state",
                                   default=False)
    verify_checkpoint: bool = _help("check every file's checksum against manifest.json on "
                                    "resume, while loading (false: sizes only)", default=True)
    preempt_timeout: float = _help("after SIGTERM/SIGUSR1, exit without a checkpoint if the "
                                   "stop has not finished within this many seconds",
                                   default=120.0)
    storage_options: str = _help("JSON dict of fsspec options for --checkpoint_dir/--data_dir",
                                 default="{}")

    @property
    def storage_options_dict(self) -> dict:
        return json.loads(self.storage_options)

PRESET_RUN_DEFAULTS_KEYS = {k for d in PRESET_RUN_DEFAULTS.values() for k in d}


class ConfigError(ValueError):
    """A bad flag or combination; main() prints it as one line and exits 2."""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _auto_bool(text: str) -> Optional[bool]:
    return None if text.lower() == "auto" else _bool(text)


def _add_fields(parser, cls, defaults_from_preset: bool) -> None:
    for f in fields(cls):
        if f.name == "model":
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _bool,
               "Optional[int]": int, "Optional[bool]": _auto_bool}[str(f.type)]
        by_preset = {p: d[f.name] for p, d in PRESET_RUN_DEFAULTS.items() if f.name in d}
        if defaults_from_preset:
            parser.add_argument(f"--{f.name}", type=typ, default=None,
                                help=f"{f.metadata['help']} (default: from --preset)")
        elif by_preset:
            note = ", ".join(f"--preset {p}: {v}" for p, v in by_preset.items())
            parser.add_argument(f"--{f.name}", type=typ, default=None,
                                help=f"{f.metadata['help']} (default: {f.default}; {note})")
        elif typ is _bool:
            parser.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True,
                                default=f.default, help=f"{f.metadata['help']} (default: %(default)s)")
        elif typ is _auto_bool:
            parser.add_argument(f"--{f.name}", type=_auto_bool, nargs="?", const=True,
                                default=f.default, help=f"{f.metadata['help']} (default: auto)")
        else:
            own = "(default:" in f.metadata["help"]  # the help says it (--seq_len)
            parser.add_argument(f"--{f.name}", type=typ, default=f.default,
                                help=f.metadata["help"] + ("" if own else " (default: %(default)s)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcp_train.main", allow_abbrev=False,  # --max_step must not mean --max_steps
        description="GPT-2 pre-training with FSDP2 and DCP checkpoints. "
                    "Launch: torchrun --nproc_per_node=N -m dcp_train.main [flags]")
    _add_fields(parser.add_argument_group("run"), Config, defaults_from_preset=False)
    _add_fields(parser.add_argument_group("model (override --preset)"), ModelConfig,
                defaults_from_preset=True)
    return parser


def parse_config(argv: Optional[list[str]] = None) -> Config:
    """Flags -> validated Config. Raises ConfigError (argparse's own errors exit 2)."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset")
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    model_overrides = {f.name: args.pop(f.name) for f in fields(ModelConfig)}
    model = dataclasses.replace(PRESETS[preset],
                                **{k: v for k, v in model_overrides.items() if v is not None})
    run_defaults = {f.name: f.default for f in fields(Config) if f.name != "model"}
    run_defaults.update(PRESET_RUN_DEFAULTS[preset])
    args = {k: run_defaults[k] if v is None and k in PRESET_RUN_DEFAULTS_KEYS else v
            for k, v in args.items()}
    cfg = Config(preset=preset, model=model, **args)
    validate(cfg)
    redact.remember(cfg.storage_options_dict)  # scrubbed from every line printed or stored
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no torch.distributed. World-size checks live in train.py."""
    m = cfg.model
    if cfg.seq_len is None:
        cfg.seq_len = m.block_size
    if cfg.seq_len > m.block_size:
        raise ConfigError(f"--seq_len {cfg.seq_len} exceeds --block_size {m.block_size}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"--n_embd {m.n_embd} is not divisible by --n_head {m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {m.dropout}")
    for name in ("max_steps", "batch_size", "seq_len", "total_batch_size", "vocab_size"):
        value = getattr(m if name == "vocab_size" else cfg, name)
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if cfg.warmup_steps < 0 or cfg.num_workers < 0:
        raise ConfigError("--warmup_steps and --num_workers must be >= 0")
    if cfg.total_batch_size % cfg.seq_len:
        raise ConfigError(f"--total_batch_size {cfg.total_batch_size} is not a multiple of "
                          f"--seq_len {cfg.seq_len}; use a multiple so a step is whole sequences")
    if cfg.resume and not cfg.checkpoint_path:
        raise ConfigError("--resume needs --checkpoint_path PATH (a step_XXXXXXXX dir)")
    if cfg.checkpoint_path and not cfg.resume:
        raise ConfigError("--checkpoint_path is only used with --resume; add --resume")
    if cfg.resume and cfg.auto_resume:
        raise ConfigError("--resume and --auto_resume contradict each other; pass one of them")
    from dcp_train.tier_policy import validate as validate_tiers
    validate_tiers(cfg)  # intervals, retention, the local tier
    try:  # the text may hold credentials: the messages never repeat it
        options = cfg.storage_options_dict
    except ValueError as e:
        raise ConfigError(f"--storage_options is not valid JSON ({e}); quote the JSON object "
                          "for your shell") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage_options must be a JSON object ({...}), got a JSON "
                          f"{type(options).__name__}")
    if cfg.lr_schedule not in ("continue", "recompute"):
        raise ConfigError(f"--lr_schedule must be continue or recompute, got {cfg.lr_schedule!r}")
    if m.vocab_size < 50257 and (cfg.generate_interval > 0 or cfg.hellaswag_interval > 0):
        raise ConfigError(f"--vocab_size {m.vocab_size} is smaller than the GPT-2 tokenizer's "
                          "50257 tokens, which text samples and HellaSwag need; set "
                          "--generate_interval 0 --hellaswag_interval 0 or a larger vocab")
    if cfg.peak_tflops < 0:
        raise ConfigError(f"--peak_tflops must be >= 0 (0: from the GPU's name), got "
                          f"{cfg.peak_tflops}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step so that total_batch_size tokens make one step."""
    per_micro = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro:
        raise ConfigError(
            f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size*seq_len*"
            f"world_size = {cfg.batch_size}*{cfg.seq_len}*{world_size} = {per_micro}; "
            f"change --batch_size or --total_batch_size")
    return cfg.total_batch_size // per_micro


def error_line(message: str) -> None:
    """The one-line error the user sees for bad input: one write(2) call, so the lines of
    several ranks sharing a pipe never interleave."""
    sys.stdout.flush()
    os.write(2, f"dcp_train: error: {' '.join(redact.scrub(message).split())}\n".encode())


def die(message: str, code: int = 2) -> None:
    error_line(message)
    raise SystemExit(code)
