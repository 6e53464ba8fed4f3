"""Typed run configuration: one dataclass per section, their checks, and the stored form.

Every flag is a dataclass field with a help line (`field(metadata={"help": ...})`); cli.py
builds the command line from them, so `--help` lists each one with its default. A flag's name
is its field's name inside its section (`--checkpoint_dir` is `cfg.checkpoint.checkpoint_dir`;
a TOML file's `[checkpoint]` table holds `checkpoint_dir`): model (nanoGPT's `GPTConfig`
names, defaulting to the chosen `--preset`), training, data, eval, logging, hardware,
checkpoint; `preset` and `storage_options` sit at the top.

`as_record(cfg)` is the flat form checkpoints and the `config` metrics record store (the form
they always had: every flag at the top, the model's dimensions under "model").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from dcp_train import redact
from dcp_train.errors import ConfigError


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
class TrainingConfig:
    """Schedule, batch, seed (`[training]`)."""

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
                                "docs/deterministic.md", default=False)


@dataclass
class DataConfig:
    """Training data (`[data]`)."""

    data_dir: str = _help("folder or fsspec URL with *_train_*.npy / *_val_*.npy uint16 token "
                          "shards (URLs are cached under $DCP_TRAIN_CACHE_DIR); the default "
                          "folder gets the embedded corpus on first use", default="data/default")
    num_workers: int = _help("data loader worker processes per rank", default=0)


@dataclass
class EvalConfig:
    """Val loss, HellaSwag and text samples (`[eval]`)."""

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


@dataclass
class LoggingConfig:
    """Metrics (`[logging]`)."""

    log_dir: str = _help("where metrics.jsonl goes", default="log")
    tensorboard: bool = _help("also write the metrics as TensorBoard scalars to "
                              "<log_dir>/tensorboard (needs the tensorboard package)",
                              default=False)
    wandb: bool = _help("also send the metrics records to Weights & Biases (rank 0; needs the "
                        "wandb package); a resumed run continues the same wandb run",
                        default=False)
    wandb_project: str = _help("the wandb project of --wandb", default="dcp_train")


@dataclass
class HardwareConfig:
    """Device, torch.compile, MFU (`[hardware]`)."""

    device: str = _help("auto, cpu or cuda", default="auto")
    compile: Optional[bool] = _help("torch.compile each transformer block: true, false or auto "
                                    "(on for CUDA, off for CPU)", default=None)
    peak_tflops: float = _help("peak TFLOP/s of one device for MFU (0: the GPU's dense bf16 "
                               "peak by name on CUDA; on CPU mfu stays null)", default=0.0)


@dataclass
class CheckpointConfig:
    """Checkpoints, both tiers, resume, preemption (`[checkpoint]`)."""

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
    drop_newer_checkpoints: bool = _help(
        "let a resume from a step older than --checkpoint_dir's newest go on: the newer steps "
        "are deleted just before this run's first save (else refused)", default=False)
    init_from: str = _help(
        "start a fresh run from a Hugging Face GPT-2 dir or fsspec URL (config.json + "
        "model.safetensors, as save_pretrained or dcp-ckpt export --hf write them): model "
        "dimensions from its config.json (dimension flags must agree), each rank loads its "
        "own shards; ignored when --auto_resume finds a checkpoint", default="")
    async_checkpoint: bool = _help("write checkpoints in the background (dcp.async_save "
                                   "style): the loop only waits for a copy of the state; with "
                                   "--local_checkpoint_dir, the local saves (each is "
                                   "replicated once committed locally)", default=False)
    verify_checkpoint: bool = _help("check every file's checksum against manifest.json on "
                                    "resume, while loading (false: sizes only)", default=True)
    preempt_timeout: float = _help("after SIGTERM/SIGUSR1, exit without a checkpoint if the "
                                   "stop has not finished within this many seconds (0: no "
                                   "limit, only a second signal exits without one)",
                                   default=120.0)
    stall_timeout: float = _help(
        "seconds any rank waits for another rank, for its save process or for a store that "
        "does not answer, in any phase, before the job exits 69 naming what stalled; also how "
        "long a dead job's writer lease blocks a relaunch (300: 100x a 124M step on one GPU, "
        "10x a 124M save to local disk; torchtitan's default collective timeout)",
        default=300.0)
    store_retry_budget: float = _help(
        "seconds a store may refuse requests (5xx, SlowDown/429, connection errors) before a "
        "save or resume gives up with exit 69; replication warns and retries at the next save "
        "(600: S3/GCS outages and throttling bursts are usually minutes)", default=600.0)


@dataclass
class Config:
    """One training run: sections of flags (a flag's name is its field's name, in its section:
    `--checkpoint_dir` is `cfg.checkpoint.checkpoint_dir`)."""

    preset: str = _help(f"model preset, one of {sorted(PRESETS)}; dimension flags override it",
                        default="gpt2-124m")
    model: ModelConfig = field(default_factory=ModelConfig)  # filled from preset + flags
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage_options: str = _help("JSON dict of fsspec options for --checkpoint_dir/--data_dir",
                                 default="{}")

    @property
    def storage_options_dict(self) -> dict:
        return json.loads(self.storage_options)


# The sections of Config, in the order of the stored (flat) form.
SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig,
            "eval": EvalConfig, "logging": LoggingConfig, "hardware": HardwareConfig,
            "checkpoint": CheckpointConfig}
PLACEHOLDER = "{node}"  # in --local_checkpoint_dir: the node rank


def as_record(cfg: Config) -> dict:
    """The run's flags as stored in a checkpoint (Progress.config) and the `config` record:
    {flag: value} for every flag, the model's dimensions as a dict under "model"."""
    record = {"preset": cfg.preset, "model": dataclasses.asdict(cfg.model)}
    for name in SECTIONS:
        if name != "model":
            record.update(dataclasses.asdict(getattr(cfg, name)))
    record["storage_options"] = cfg.storage_options
    return record


def redacted_config(cfg: Config) -> dict:
    """as_record(cfg) with credentials redacted: what a checkpoint's `meta` and the metrics
    `config` record store. `storage_options` stays a JSON string (redacted)."""
    return redact.redact_config_dict(as_record(cfg))


def local_path(template: str, node: int) -> str:
    """--local_checkpoint_dir of node `node`: `{node}` replaced by its rank, made absolute."""
    return os.path.abspath(template.replace(PLACEHOLDER, str(node)))


def validate(cfg: Config) -> None:
    """Checks that need no torch.distributed (world-size checks: train/loop.grad_accum_steps and
    train/deterministic.py). Fills in seq_len (default: block_size)."""
    t, m, ck, ev = cfg.training, cfg.model, cfg.checkpoint, cfg.eval
    check_ranges(cfg)  # before seq_len takes block_size: a bad block_size is named as such
    if t.seq_len is None:
        t.seq_len = m.block_size
    if t.seq_len > m.block_size:
        raise ConfigError(f"--seq_len {t.seq_len} exceeds --block_size {m.block_size}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"--n_embd {m.n_embd} is not divisible by --n_head {m.n_head}")
    check_paths(cfg)
    if t.total_batch_size % t.seq_len:
        raise ConfigError(f"--total_batch_size {t.total_batch_size} is not a multiple of "
                          f"--seq_len {t.seq_len}; use a multiple so a step is whole sequences")
    if ck.resume and not ck.checkpoint_path:
        raise ConfigError("--resume needs --checkpoint_path PATH (a step_XXXXXXXX dir)")
    if ck.checkpoint_path and not ck.resume:
        raise ConfigError("--checkpoint_path is only used with --resume; add --resume")
    if ck.resume and ck.auto_resume:
        raise ConfigError("--resume and --auto_resume contradict each other; pass one of them")
    validate_checkpoint(ck)  # intervals, retention, the local tier
    try:  # the text may hold credentials: the messages never repeat it
        options = cfg.storage_options_dict
    except ValueError as e:
        raise ConfigError(f"--storage_options is not valid JSON ({e}); quote the JSON object "
                          "for your shell") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage_options must be a JSON object ({...}), got a JSON "
                          f"{type(options).__name__}")
    if t.lr_schedule not in ("continue", "recompute"):
        raise ConfigError(f"--lr_schedule must be continue or recompute, got {t.lr_schedule!r}")
    if m.vocab_size < 50257 and (ev.generate_interval > 0 or ev.hellaswag_interval > 0):
        raise ConfigError(f"--vocab_size {m.vocab_size} is smaller than the GPT-2 tokenizer's "
                          "50257 tokens, which text samples and HellaSwag need; set "
                          "--generate_interval 0 --hellaswag_interval 0 or a larger vocab")
    if cfg.logging.wandb and not _installed("wandb"):  # every rank says it, before any start
        raise ConfigError("--wandb needs the wandb package: pip install 'dcp_train[wandb]' "
                          "(or pip install wandb)")
    if cfg.hardware.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {cfg.hardware.device!r}")


# (flag, accepted?, what it accepts): the range of every number flag (check_ranges)
_RANGES = [
    ("max_steps", lambda v: v >= 1, ">= 1"),
    ("stop_at_step", lambda v: v == -1 or v >= 1, "-1 (off) or a step >= 1"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("max_lr", lambda v: v >= 0, "a number >= 0 (0: the weights stay as they are)"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("grad_clip", lambda v: v > 0, "a number > 0"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("seq_len", lambda v: v is None or v >= 1, ">= 1"),
    ("total_batch_size", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("eval_interval", lambda v: v >= -1, ">= 1, or 0 or -1 (off)"),
    ("val_steps", lambda v: v >= 1, ">= 1"),
    ("hellaswag_interval", lambda v: v >= -1, ">= 1, or 0 or -1 (off)"),
    ("hellaswag_limit", lambda v: v == -1 or v >= 1, "-1 (all) or >= 1"),
    ("generate_interval", lambda v: v >= -1, ">= 1, or 0 or -1 (off)"),
    ("peak_tflops", lambda v: v >= 0, ">= 0 (0: from the GPU's name)"),
    ("preempt_timeout", lambda v: v >= 0,
     "seconds >= 0 (0: no limit, only a second signal exits without a checkpoint)"),
    ("stall_timeout", lambda v: v >= 1, "seconds >= 1"),
    ("store_retry_budget", lambda v: v >= 0, "seconds >= 0 (0: no retries beyond the store client's own)"),
    ("block_size", lambda v: v >= 1, ">= 1"),
    ("vocab_size", lambda v: v >= 1, ">= 1"),
    ("n_layer", lambda v: v >= 1, ">= 1"),
    ("n_head", lambda v: v >= 1, ">= 1"),
    ("n_embd", lambda v: v >= 1, ">= 1"),
    ("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
]
# (flag, what a local path that exists must be): files and dirs of the wrong kind
_PATHS = [("checkpoint_dir", "dir"), ("log_dir", "dir"), ("data_dir", "dir"),
          ("local_checkpoint_dir", "dir"), ("checkpoint_path", "dir"),
          ("hellaswag_path", "file"), ("tokenizer_file", "file")]
_NOT_EMPTY = ("checkpoint_dir", "log_dir", "data_dir")


def flag_value(cfg: Config, flag: str):
    """The value of `--flag`, from whichever section holds it."""
    section = next(s for s in SECTIONS if hasattr(getattr(cfg, s), flag))
    return getattr(getattr(cfg, section), flag)


def check_ranges(cfg: Config) -> None:
    """Every number flag in its range (_RANGES); NaN fails every check. One ConfigError line
    naming the flag, what it accepts and the value given."""
    for flag, ok, accepts in _RANGES:
        value = flag_value(cfg, flag)
        if not ok(value):
            raise ConfigError(f"--{flag} must be {accepts}, got {value}")


def check_paths(cfg: Config) -> None:
    """No empty path where one is needed; a local path that exists is of the right kind (a
    dir where a dir is written or read, a file where a file is read). URLs are checked by
    their stores at run time."""
    for flag in _NOT_EMPTY:
        if not flag_value(cfg, flag).strip():
            raise ConfigError(f"--{flag} is empty; give a path")
    for flag, kind in _PATHS:
        value = flag_value(cfg, flag)
        path = value.removeprefix("file://").replace(PLACEHOLDER, "0")
        if not value or "://" in path or not os.path.exists(path):
            continue
        if kind == "dir" and not os.path.isdir(path):
            raise ConfigError(f"--{flag} {value} is a file, not a directory; give a directory")
        if kind == "file" and os.path.isdir(path):
            raise ConfigError(f"--{flag} {value} is a directory, not a file; give a file")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: its import is blocked
        return False


def validate_checkpoint(ck: CheckpointConfig) -> None:
    """Flag checks of the checkpoint section (both tiers); one-line ConfigErrors."""
    for flag in ("checkpoint_interval", "local_checkpoint_interval"):
        if getattr(ck, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0 (0: off), got {getattr(ck, flag)}")
    for flag in ("keep_last_n_checkpoints", "keep_last_n_local_checkpoints"):
        if getattr(ck, flag) == 0 or getattr(ck, flag) < -1:
            raise ConfigError(f"--{flag} must be -1 (keep all) or >= 1")
    for flag in ("checkpoint_interval_minutes", "local_checkpoint_interval_minutes"):
        if not getattr(ck, flag) >= 0:
            raise ConfigError(f"--{flag} must be >= 0 (0: off), got {getattr(ck, flag)}")
    local = ck.local_checkpoint_dir
    if not local:
        if ck.local_checkpoint_interval or ck.local_checkpoint_interval_minutes:
            raise ConfigError("--local_checkpoint_interval(_minutes) needs "
                              "--local_checkpoint_dir PATH")
        return
    if "://" in local:
        raise ConfigError(f"--local_checkpoint_dir must be a node-local path, not a URL "
                          f"({local}); the durable tier is --checkpoint_dir")
    durable = ck.checkpoint_dir.removeprefix("file://")
    if "://" not in durable and local_path(local, 0) == os.path.abspath(durable):
        raise ConfigError("--local_checkpoint_dir is --checkpoint_dir; give the local tier "
                          "its own node-local dir")

