"""What goes into a checkpoint, and how it is put back. How it is committed is checkpoint.py.

The DCP state dict of a checkpoint (DCP flattens nested dicts into dotted keys):

    model.<fqn>                 FSDP2 DTensor shards (get_model_state_dict), reshardable; a
                                parameter reachable under two names (GPT-2's lm_head.weight is
                                transformer.wte.weight) is stored once, under its first name
    optim.<fqn>.{step,exp_avg,exp_avg_sq}
                                AdamW state (get_optimizer_state_dict); param_groups are not
                                saved: hyperparameters come from the flags, the LR from the step
    meta                        uint8 tensor of JSON: step, tokens, val_loss, world_size,
                                samples_per_step, config (same on every rank)
    rank_00003.torch_cpu        per-rank torch CPU RNG state (uint8)
    rank_00003.cuda             per-rank CUDA RNG states of all devices (CUDA runs only)
    rank_00003.json             uint8 tensor of JSON: numpy and python RNG, loader state dict

Per-rank keys contain the rank: DCP keeps one copy of identical keys across ranks, so a shared
key would silently keep one rank's value. Everything that is not a tensor is JSON inside a uint8
tensor, so loading never needs pickle (no `torch.load` with weights_only off).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dcp_train import rng

FORMAT_VERSION = 1
# torch's warning for dcp.load(no_dist=True) (state_dict_loader.py), matched from its start
NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


@dataclass
class Progress:
    """Training progress, the part of the loop's state that is not model/optimizer/RNG/data."""

    step: int = 0  # optimizer updates applied
    tokens: int = 0  # training tokens consumed
    val_loss: Optional[float] = None  # last val loss measured


def rank_key(rank: int) -> str:
    return f"rank_{rank:05d}"


def json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor):
    return json.loads(bytes(t.numpy().tobytes()).decode())


def tied_aliases(model) -> dict[str, str]:
    """{alias: name} of parameters registered under more than one name (weight tying)."""
    first, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def build(model, optimizer, progress: Progress, loader, rank: int, world_size: int,
          samples_per_step: int, config: dict) -> dict:
    """The state dict this rank hands to dcp.save."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    for alias in tied_aliases(model):
        del model_sd[alias]
    rng_tensors, rng_plain = rng.capture()
    meta = {"format_version": FORMAT_VERSION, **asdict(progress), "world_size": world_size,
            "samples_per_step": samples_per_step, "global_sample_cursor":
            progress.step * samples_per_step, "config": config}
    return {
        "model": model_sd,
        "optim": optim_sd["state"],
        "meta": json_tensor(meta),
        rank_key(rank): {**rng_tensors,
                         "json": json_tensor({"rng": rng_plain, "loader": loader.state_dict()})},
    }


def _template(metadata, key: str) -> torch.Tensor:
    md = metadata.state_dict_metadata[key]
    return torch.empty(md.size, dtype=md.properties.dtype)


def read_meta(reader) -> dict:
    """The checkpoint's meta entry, read by this process alone (no collective)."""
    sd = {"meta": _template(reader.read_metadata(), "meta")}
    with warnings.catch_warnings():  # reading alone is the intent: torch's note says so
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)  # on every resume (#13)
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return tensor_json(sd["meta"])


def load(reader, model, optimizer, rank: int, with_rank_entry: bool) -> Optional[dict]:
    """Load model and optimizer in place (resharding as needed); return this rank's entry.

    `with_rank_entry` is False when the world size changed: then no rank reads a saved rank's
    RNG/loader entry (train.py reseeds and rebuilds the loader from the global position).
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)  # templates; initialises AdamW state
    aliases = tied_aliases(model)
    sd = {"model": {k: v for k, v in model_sd.items() if k not in aliases},
          "optim": optim_sd["state"]}
    entry_keys = []
    if with_rank_entry:
        metadata = reader.read_metadata()
        prefix = rank_key(rank) + "."
        entry_keys = [k[len(prefix):] for k in metadata.state_dict_metadata if k.startswith(prefix)]
        sd[rank_key(rank)] = {k: _template(metadata, prefix + k) for k in entry_keys}
    dcp.load(sd, storage_reader=reader)  # an older checkpoint's stored alias is not read
    sd["model"].update({alias: sd["model"][name] for alias, name in aliases.items()})
    set_state_dict(model, optimizer, model_state_dict=sd["model"],
                   optim_state_dict={"state": sd["optim"],
                                     "param_groups": optim_sd["param_groups"]})
    if not with_rank_entry:
        return None
    entry = sd[rank_key(rank)]
    plain = tensor_json(entry.pop("json"))
    return {"rng_tensors": entry, "rng_plain": plain["rng"], "loader": plain["loader"]}
