"""The model dimensions of a Hugging Face GPT-2 directory (--init_from), from its config.json.

    dims = hf_model_dims("s3://bucket/gpt2", storage_options)
    # {"block_size": 1024, "vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768}

Read at flag-parsing time (no torch): cli.py puts these dimensions into the run's
ModelConfig and refuses explicit dimension flags that differ. The weights are loaded later, onto
the sharded model, by hf_import.py.

Only the GPT-2 architecture that dcp_train's model computes is accepted: `model_type` gpt2,
GELU(tanh) (`gelu_new`), LayerNorm eps 1e-5, an MLP of 4 * n_embd, tied token embedding and
lm_head, attention scaled by 1/sqrt(head dim) and nothing else. Anything else is a
ConfigError naming the key, so a run never silently computes another model.
"""

from __future__ import annotations

import json
import posixpath

from dcp_train.store import options as store_options
from dcp_train.errors import ConfigError, one_line

CONFIG_FILE = "config.json"
# our ModelConfig field -> GPT2Config key
DIMS = {"block_size": "n_positions", "vocab_size": "vocab_size", "n_layer": "n_layer",
        "n_head": "n_head", "n_embd": "n_embd"}
# GPT2Config key -> (value our model computes, value assumed when the key is absent)
REQUIRED = {
    "activation_function": ("gelu_new", "gelu_new"),
    "layer_norm_epsilon": (1e-5, 1e-5),
    "tie_word_embeddings": (True, True),
    "scale_attn_weights": (True, True),
    "scale_attn_by_inverse_layer_idx": (False, False),
    "reorder_and_upcast_attn": (False, False),
}


def read_hf_config(url: str, storage_options: dict) -> dict:
    """config.json of the directory `url` (local path or fsspec URL) as a dict."""

    path = posixpath.join(url.rstrip("/"), CONFIG_FILE)
    try:
        fs, root = store_options.url_to_fs(path, storage_options)
        with fs.open(root, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(f"--init_from {url} has no {CONFIG_FILE}; give a directory written "
                            "by transformers' save_pretrained or dcp-ckpt export --hf") from None
    except ValueError as e:
        raise ConfigError(f"--init_from {path} is not valid JSON ({e})") from None
    except Exception as e:  # endpoint unreachable, credentials refused, s3fs/gcsfs missing
        raise ConfigError(f"cannot read --init_from {path}: {one_line(e)}") from None


def hf_model_dims(url: str, storage_options: dict) -> dict:
    """{block_size, vocab_size, n_layer, n_head, n_embd} of the GPT-2 at `url`; ConfigError
    if it is not a GPT-2 that dcp_train's model computes exactly."""
    config = read_hf_config(url, storage_options)
    where = f"--init_from {posixpath.join(url.rstrip('/'), CONFIG_FILE)}"
    if config.get("model_type") != "gpt2":
        raise ConfigError(f"{where}: model_type is {config.get('model_type')!r}, not 'gpt2'; "
                            "only GPT-2 checkpoints can start a run")
    missing = [key for key in DIMS.values() if not isinstance(config.get(key), int)]
    if missing:
        raise ConfigError(f"{where}: no integer {', '.join(missing)}; not a GPT2Config")
    dims = {ours: config[theirs] for ours, theirs in DIMS.items()}
    for key, (ours, default) in REQUIRED.items():
        if config.get(key, default) != ours:
            raise ConfigError(f"{where}: {key} is {config[key]!r}, but dcp_train's GPT-2 "
                                f"computes {ours!r}; this checkpoint needs another model")
    inner = config.get("n_inner")
    if inner is not None and inner != 4 * dims["n_embd"]:
        raise ConfigError(f"{where}: n_inner is {inner}, but dcp_train's MLP is 4 * n_embd "
                            f"= {4 * dims['n_embd']}")
    return dims
