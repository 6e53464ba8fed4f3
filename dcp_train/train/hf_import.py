"""--init_from: a Hugging Face GPT-2 directory's weights onto the FSDP2-sharded model.

    directory = local_init_dir(cfg.init_from, storage_options)  # a URL: a per-node cache
    load_hf_weights(model, directory)                            # every rank, its own shards

A directory holds `config.json` and `model.safetensors`, or `model.safetensors.index.json`
and the files its `weight_map` names: what transformers' `save_pretrained` and
`dcp-ckpt export --hf` write. The dimensions were taken from `config.json` when the flags were
parsed (hf_config.py), so the model built from them has the file's shapes.

Shard by shard, no gathering: FSDP2 shards every parameter on dim 0 over the 1-D mesh (rank r
holds rows [r*c, r*c + local rows), c = ceil(rows / world size), as torch.chunk). Each rank
opens the safetensors files (a memory map) and reads with `get_slice` only the rows of its own
shards, copied into its local tensors. No rank ever holds a whole parameter it does not own.

What differs from dcp_train's model, and how it is read:
- Conv1D: HF's c_attn, attn.c_proj, c_fc and mlp.c_proj weights are (in, out), ours
  (nn.Linear) (out, in): a rank reads its columns and transposes them.
- Names: GPT2LMHeadModel files say `transformer.h.0...`; GPT2Model files (OpenAI's original
  `gpt2` upload) say `h.0...`: both are read.
- Tied weights: the token embedding and the lm_head are one parameter. The file's
  `transformer.wte.weight` fills it; an `lm_head.weight` in the file is ignored (transformers
  ties it to wte on load too; hf_config.py refuses untied configs).
- `attn.bias` / `attn.masked_bias` of older checkpoints are the causal mask buffers, not
  weights: ignored.
Any other missing or extra tensor, or a shape that does not fit, is a ConfigError naming it.
"""

from __future__ import annotations

import json
import os
import posixpath
from contextlib import ExitStack

import torch
from torch.distributed.tensor import DTensor, Shard

from dcp_train.store import options as store_options
from dcp_train.data.remote import cache_dir, download, is_remote
from dcp_train.errors import ConfigError, one_line
from dcp_train.train.hf_config import CONFIG_FILE

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PREFIX = "transformer."
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TIED = "lm_head.weight"
MASKS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older files


def local_init_dir(url: str, storage_options: dict) -> str:
    """`url` itself if it is local; else the node's cache of its config.json and safetensors
    files (downloaded once, atomically; call on one rank per node)."""
    if not is_remote(url):
        return url.removeprefix("file://")

    try:
        fs, root = store_options.url_to_fs(url, storage_options)
        root = root.rstrip("/")
        listing = {posixpath.basename(i["name"].rstrip("/")): i
                   for i in fs.ls(root, detail=True)}
    except Exception as e:
        raise ConfigError(f"cannot list --init_from {url}: {one_line(e)}") from None
    wanted = {n: i for n, i in listing.items()
              if n == CONFIG_FILE or n == INDEX or n.endswith(".safetensors")}
    local = cache_dir(url, "init")
    download(fs, root, wanted, local, url)
    return local


def weight_files(directory: str) -> dict[str, str]:
    """{tensor name in the files: file path} of a HF directory."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--init_from: {index} is not a safetensors index "
                              f"({one_line(e)}); copy or export it again") from None
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, SINGLE)
    if not os.path.isfile(single):
        raise ConfigError(f"--init_from {directory} has neither {SINGLE} nor {INDEX}; save "
                          "the model with save_pretrained(..., safe_serialization=True)")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def open_safetensors(path: str):
    """safetensors' safe_open of `path`; a cut, empty or corrupt file (SafetensorError) is
    one ConfigError naming it."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError ("incomplete metadata", ...), OSError
        raise ConfigError(f"--init_from: {path} is not a readable safetensors file "
                          f"({one_line(e)}); copy or export it again") from None


def _our_name(key: str) -> str:
    return key if key.startswith(PREFIX) else PREFIX + key


def _own_rows(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(first row, local tensor) of this rank's dim-0 shard of `param` (all of a plain one)."""
    if not isinstance(param, DTensor):
        return 0, param
    if tuple(param.placements) != (Shard(0),):
        raise ConfigError(f"--init_from expects FSDP2's dim-0 shards, got {param.placements}")
    mesh = param.device_mesh
    chunk = -(-param.shape[0] // mesh.size())  # torch.chunk's size
    return min(mesh.get_local_rank() * chunk, param.shape[0]), param.to_local()


def load_hf_weights(model: torch.nn.Module, directory: str) -> None:
    """Copy the HF GPT-2 weights of `directory` into `model` (sharded or not), each rank only
    its own rows. ConfigError if the tensors do not fit the model one for one."""
    files = weight_files(directory)
    keys = {_our_name(k): k for k in files if k != TIED and not k.endswith(MASKS)}
    params = dict(model.named_parameters())  # the tied lm_head.weight appears once, as wte
    missing, extra = sorted(set(params) - set(keys)), sorted(set(keys) - set(params))
    if missing or extra:
        raise ConfigError(f"--init_from {directory} does not fit the GPT-2 model: missing "
                          f"{missing or 'none'}, unexpected {extra or 'none'}")
    with ExitStack() as stack, torch.no_grad():
        handles = {path: stack.enter_context(open_safetensors(path))
                   for path in set(files.values())}
        for name, param in params.items():
            key = keys[name]
            piece = handles[files[key]].get_slice(key)
            conv1d = name.endswith(HF_CONV1D)
            shape = tuple(piece.get_shape())
            if (shape[::-1] if conv1d else shape) != tuple(param.shape):
                raise ConfigError(f"--init_from {directory}: {key} has shape {list(shape)}, "
                                  f"the model needs {list(param.shape)}")
            start, local = _own_rows(param)
            end = start + local.shape[0]
            rows = piece[:, start:end].t() if conv1d else piece[start:end]
            local.copy_(rows)
