"""Consolidated model weights out of a sharded DCP checkpoint, in one process.

    weights, meta = load_model_weights(storage, step_dir)   # {fqn: full tensor}, saved meta
    model = model_from_weights(weights, meta)               # a plain (unsharded) GPT
    tensors = export_tensors(weights, meta, hf=True)        # the file's contents

No process group, no knowledge of the saved world size, no optimizer: the DCP metadata
(`.metadata`) holds every entry's full shape and dtype, so we build empty full-size templates
for the `model.*` keys only and `dcp.load(..., no_dist=True)` reassembles each tensor from the
shards that every rank wrote.

Tied weights. The token embedding and the lm_head are one tensor (GPT-2 weight tying); the
checkpoint holds it under both names. An export stores it once, as `transformer.wte.weight`,
and never `lm_head.weight` (safetensors refuses shared tensors; Hugging Face GPT-2 files omit
`lm_head.weight` too). Load an export with `load_state_dict(sd, strict=False)`: the only
missing key is `lm_head.weight`, which is the same Parameter as `transformer.wte.weight`.

Hugging Face layout (`hf=True`): our parameter names are already HF GPT-2's
(`transformer.h.N.attn.c_attn.weight`, ...). HF uses Conv1D (weight shape (in, out)) where we
use nn.Linear ((out, in)), so the c_attn, attn.c_proj, c_fc and mlp.c_proj weights are
transposed; a padded vocabulary (50304) is cut back to GPT-2's 50257 rows. `hf_config` is the
matching `config.json` for transformers' GPT2Config.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_train.checkpoint.state import tensor_json
from dcp_train.config import ModelConfig
from dcp_train.checkpoint.io.manifest import ManifestError, require_intact
from dcp_train.job.progress import received_bytes
from dcp_train.model import GPT

MODEL_PREFIX = "model."
TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight
WTE = "transformer.wte.weight"
GPT2_VOCAB = 50257  # GPT-2's real vocabulary; rows beyond it are padding
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(RuntimeError):
    """Something about the checkpoint or the request that the user has to fix."""


def load_model_weights(storage, path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """({fqn: full tensor} of the model, the checkpoint's meta dict) of committed step dir
    `path`, whose every file is first checked against its manifest.json (ExportError, one
    line, if anything is damaged, truncated or missing: no tensor is handed out unverified)."""
    try:
        require_intact(storage, path)
    except ManifestError as e:
        raise ExportError(str(e)) from None
    reader = storage.dcp_reader(path)
    reader.downloading = lambda nbytes: received_bytes("checkpoint download", nbytes)  # a bar
    try:
        entries = reader.read_metadata().state_dict_metadata
    except Exception as e:
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e} (try dcp-ckpt verify)")
    sd = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in entries.items()
          if isinstance(md, TensorStorageMetadata) and (k.startswith(MODEL_PREFIX) or k == "meta")}
    if "meta" not in sd or len(sd) == 1:
        raise ExportError(f"{path} has no 'meta' or no 'model.*' entries: "
                          "not a dcp_train checkpoint")
    try:
        dcp.load(sd, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e} (try dcp-ckpt verify)")
    meta = tensor_json(sd.pop("meta"))
    return {k[len(MODEL_PREFIX):]: v for k, v in sd.items()}, meta


def model_config(meta: dict) -> ModelConfig:
    return ModelConfig(**meta["config"]["model"])


def model_from_weights(weights: dict[str, torch.Tensor], meta: dict) -> GPT:
    """A plain GPT with the checkpoint's dimensions and weights (lm_head tied to wte)."""
    model = GPT(model_config(meta))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {TIED}:
        raise ExportError(f"checkpoint does not fit the model: missing {missing}, "
                          f"unexpected {unexpected}")
    return model


def export_tensors(weights: dict[str, torch.Tensor], meta: dict, hf: bool = False,
                   dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """What an export file holds: our names (or HF's layout), tied weight once, in `dtype`."""
    if TIED in weights and not torch.equal(weights[TIED], weights[WTE]):
        raise ExportError(f"{TIED} differs from {WTE}, but the model ties them")
    out = {k: v for k, v in weights.items() if k != TIED}
    if hf:
        out = {k: _to_hf(k, v) for k, v in out.items()}
    return {k: v.to(DTYPES[dtype]).contiguous() for k, v in out.items()}


def _to_hf(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(HF_CONV1D):
        return t.t()
    if name == WTE and t.size(0) > GPT2_VOCAB:
        return t[:GPT2_VOCAB]
    return t


def hf_config(meta: dict, dtype: str = "fp32") -> dict:
    """config.json for transformers' GPT2Config / GPT2LMHeadModel."""
    m = model_config(meta)
    vocab = min(m.vocab_size, GPT2_VOCAB)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": m.block_size, "n_ctx": m.block_size,
        "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": None,
        "activation_function": "gelu_new",  # = GELU(approximate="tanh")
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }
    eot = GPT2_VOCAB - 1 if vocab == GPT2_VOCAB else None  # <|endoftext|>, if in the vocab
    config.update(bos_token_id=eot, eos_token_id=eot)
    return config


def write_export(tensors: dict[str, torch.Tensor], out: str, fmt: str,
                 config: dict | None = None) -> list[str]:
    """Write `tensors` to local file `out` (and `config.json` beside it); return the paths.
    `out` appears whole or not at all: written under a temp name, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        _write_tensors(tensors, tmp, fmt)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    written = [out]
    if config is not None:
        cpath = os.path.join(os.path.dirname(os.path.abspath(out)), "config.json")
        with open(cpath, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        written.append(cpath)
    return written


def _write_tensors(tensors: dict[str, torch.Tensor], out: str, fmt: str) -> None:
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ExportError("--format safetensors needs the safetensors package: "
                              "pip install 'dcp_train[export]' (or pip install safetensors)")
        save_file(tensors, out, metadata={"format": "pt"})
    elif fmt == "torch":
        torch.save(tensors, out)  # plain tensors: torch.load(weights_only=True) reads it
    else:
        raise ExportError(f"unknown format {fmt!r}; use safetensors or torch")
def load_full_state(step_dir, tmp_dir) -> dict:
    """Everything a LOCAL step dir holds as one flat dict of full tensors, keys joined with '.'
    ('model.transformer.wte.weight', 'optim.state...', 'rank_00000.json', ...), through torch's
    own converter (dcp_to_torch_save into a file under `tmp_dir`, loaded weights_only, removed).
    For comparing whole checkpoints bit for bit (tests, bench/gpu_check.py)."""
    target = os.path.join(str(tmp_dir), f"{os.path.basename(str(step_dir))}-"
                                        f"{time.monotonic_ns()}.pt")
    dcp_to_torch_save(str(step_dir), target)
    try:
        return _flatten(torch.load(target, weights_only=True))
    finally:
        os.unlink(target)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat
