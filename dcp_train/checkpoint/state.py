"""What a checkpoint holds: components that save and restore themselves.

Each component follows torch.distributed.checkpoint's Stateful protocol: `state_dict()` gives
the entries it adds to the checkpoint, `load_state_dict(sd)` takes them back (sd holds at least
its own entries). The manager (manager.py) saves them and the resume (resume.py, through
restore.py) loads them in the order given, so a component may rely on those before it (the
rank entry's parts come after Progress). Adding one (an LR scheduler, a grad scaler) is one
line where the trainer lists them. The DCP entries (DCP flattens nested
dicts into dotted keys)::

    model.<fqn>                 ModelState: FSDP2 DTensor shards (get_model_state_dict),
                                reshardable; a parameter reachable under two names (GPT-2's
                                lm_head.weight is transformer.wte.weight) is stored once
    optim.<fqn>.{step,exp_avg,exp_avg_sq}
                                OptimizerState: AdamW state; param_groups are not saved, the
                                hyperparameters come from the flags and the LR from the step
    meta                        Progress: uint8 tensor of JSON (format_version, step, tokens,
                                val_loss, world_size, samples_per_step, global_sample_cursor,
                                config, data_fingerprint, lr_schedule), the same on every rank
    rank_00003.torch_cpu        RankEntry of rank 3: the tensors of its parts (RNGState: torch
    rank_00003.cuda             CPU and, on CUDA runs, its device's CUDA generator) and one uint8
    rank_00003.json             JSON tensor of their plain parts ({"rng": numpy and python
                                generators, "loader": the StatefulDataLoader state})

Per-rank keys contain the rank: DCP keeps one copy of identical keys across ranks. Everything
that is not a tensor is JSON inside a uint8 tensor, so loading never unpickles anything.
A rank entry is only read back at the world size it was saved at; otherwise (and at a fresh
start) each part starts `fresh()`: the loader at the global position of the step, the RNG
seeded from (seed, step, rank).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from dcp_train.checkpoint import rng

# 1: the layout above (every checkpoint so far). Bump it when a change means older code would
# misread a checkpoint; this code refuses a newer one and must keep loading every older one.
FORMAT_VERSION = 1
# torch's warning for dcp.load(no_dist=True), matched from its start
NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


def json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor):
    return json.loads(bytes(t.numpy().tobytes()).decode())


def read_meta(reader) -> dict:
    """The `meta` entry of a checkpoint, read by this process alone (no collective)."""
    md = reader.read_metadata().state_dict_metadata["meta"]
    sd = {"meta": torch.empty(md.size, dtype=md.properties.dtype)}
    with warnings.catch_warnings():  # torch says it assumes one process: that is the intent
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return tensor_json(sd["meta"])


def tied_aliases(model) -> dict[str, str]:
    """{alias: name} of parameters registered under more than one name (weight tying)."""
    first, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


class ModelState:
    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        sd = get_model_state_dict(self.model)
        for alias in tied_aliases(self.model):
            del sd[alias]  # an older checkpoint's stored alias is simply not read
        return {"model": sd}

    def load_state_dict(self, sd: dict) -> None:
        model_sd = dict(sd["model"])
        model_sd.update({a: model_sd[n] for a, n in tied_aliases(self.model).items()})
        set_model_state_dict(self.model, model_sd)


class OptimizerState:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        # as a load template this also creates AdamW's state, which is lazy
        return {"optim": get_optimizer_state_dict(self.model, self.optimizer)["state"]}

    def load_state_dict(self, sd: dict) -> None:
        groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        set_optimizer_state_dict(self.model, self.optimizer,
                                 {"state": sd["optim"], "param_groups": groups})


@dataclass
class Progress:
    """Where the run is, and what defines it (the `meta` entry)."""

    step: int = 0  # optimizer updates applied
    tokens: int = 0  # training tokens consumed
    val_loss: Optional[float] = None  # last val loss measured
    world_size: int = 1
    samples_per_step: int = 0
    config: dict = field(default_factory=dict)  # the run's flags (Config, credentials redacted)
    data_fingerprint: Optional[dict] = None  # data/fingerprint.py, of the training shards
    lr_schedule: Optional[dict] = None  # optim.schedule_for_launch: the schedule in effect
    saved: Optional[dict] = None  # the meta of the checkpoint resumed from
    wandb_id: Optional[str] = None  # the run's id for --wandb: made at step 0, kept after

    def state_dict(self) -> dict:
        meta = {"format_version": FORMAT_VERSION, "step": self.step, "tokens": self.tokens,
                "val_loss": self.val_loss, "world_size": self.world_size,
                "samples_per_step": self.samples_per_step,
                "global_sample_cursor": self.step * self.samples_per_step, "config": self.config,
                "data_fingerprint": self.data_fingerprint, "lr_schedule": self.lr_schedule,
                "wandb_id": self.wandb_id}
        return {"meta": json_tensor(meta)}

    def load_state_dict(self, sd: dict) -> None:
        meta = tensor_json(sd["meta"])
        self.step, self.tokens, self.val_loss = meta["step"], meta["tokens"], meta["val_loss"]
        self.saved = meta
        self.wandb_id = meta.get("wandb_id")  # None in checkpoints written before it existed


class RNGState:
    """This rank's generators: torch CPU (and CUDA), numpy, Python."""

    tensors = ("torch_cpu", "cuda")

    def __init__(self, seed: int, rank: int, progress: Progress):
        self.seed, self.rank, self.progress = seed, rank, progress
        self.how = "seeded(seed, step, rank)"

    def state_dict(self) -> dict:
        tensors, plain = rng.capture()
        return {"tensors": tensors, "json": plain}

    def load_state_dict(self, sd: dict) -> None:
        rng.restore(sd["tensors"], sd["json"])
        self.how = "restored"

    def fresh(self) -> None:
        rng.seed_all(self.seed, self.progress.step, self.rank)
        self.how = "seeded(seed, step, rank)"


class LoaderState:
    """This rank's StatefulDataLoader. `build(step)` makes one that starts after `step`."""

    tensors = ()

    def __init__(self, build: Callable[[int], object], num_workers: int, progress: Progress):
        self.build, self.num_workers, self.progress = build, num_workers, progress
        self.loader = None

    def state_dict(self) -> dict:
        return {"tensors": {}, "json": self.loader.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.fresh()
        # torchdata's state is only valid for the same worker count (it asserts); otherwise
        # the loader fresh() built already starts at the same global position
        if self.progress.saved["config"]["num_workers"] == self.num_workers:
            self.loader.load_state_dict(sd["json"])

    def fresh(self) -> None:
        self.loader = self.build(self.progress.step)


class RankEntry:
    """rank_XXXXX: the parts of this rank's state that no other rank has."""

    def __init__(self, rank: int, **parts):
        self.key, self.parts = f"rank_{rank:05d}", parts

    def state_dict(self) -> dict:
        tensors, plain = {}, {}
        for name, part in self.parts.items():
            sd = part.state_dict()
            tensors.update(sd["tensors"])
            plain[name] = sd["json"]
        return {self.key: {**tensors, "json": json_tensor(plain)}}

    def load_state_dict(self, sd: dict) -> None:
        entry = dict(sd[self.key])
        plain = tensor_json(entry.pop("json"))
        for name, part in self.parts.items():
            part.load_state_dict({"tensors": {k: entry[k] for k in part.tensors if k in entry},
                                  "json": plain[name]})

    def fresh(self) -> None:
        for part in self.parts.values():
            part.fresh()
