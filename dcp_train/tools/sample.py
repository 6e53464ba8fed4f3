"""Text samples from a checkpoint: `python -m dcp_train.sample --checkpoint CKPT --prompt "..."`.

CKPT is a step dir or a checkpoint dir (then the step dir its `latest` names), local or an
fsspec URL (with --storage_options). The model weights are read in this one process exactly as
`dcp-ckpt export` reads them (no process group, any saved world size, no optimizer) into a
plain GPT, and sampled with dcp_train.generate (top-k, then multinomial, seeded).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.data.tokenizer import EOT, TokenizerError, get_tokenizer
from dcp_train.errors import CheckpointError
from dcp_train.tools import paths
from dcp_train.tools.ckpt import ToolError
from dcp_train.tools.export import ExportError, load_model_weights, model_from_weights
from dcp_train.train.generate import generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp_train.sample", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="step dir or checkpoint dir")
    p.add_argument("--prompt", default="Hello, I'm a language model,",
                   help="(default: %(default)r)")
    p.add_argument("--num_samples", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--top_k", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="(default: %(default)s: cuda if available)")
    p.add_argument("--storage_options", default="{}", help="JSON dict of fsspec options")
    p.add_argument("--tokenizer_file", default="", help="local tiktoken BPE file (offline)")
    return p


def sample(args) -> list[str]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths.input_dir(args.checkpoint, "--checkpoint", "a step dir or a checkpoint dir")
    if args.tokenizer_file:
        paths.input_file(args.tokenizer_file, "--tokenizer_file", "a tiktoken BPE file")
    directory = CheckpointDir(args.checkpoint, json.loads(args.storage_options))
    storage, path = directory.storage, directory.resolve()
    weights, meta = load_model_weights(storage, path)
    model = model_from_weights(weights, meta).to(device)
    enc = get_tokenizer(args.tokenizer_file)
    vocab = model.config.vocab_size
    too_big = sorted({t for t in enc.encode(args.prompt) or [EOT] if t >= vocab})
    if too_big:
        raise ToolError(f"the prompt has token ids {too_big[:5]} but the model's vocab_size is "
                        f"{vocab}; use a prompt of tokens below {vocab}")
    print(f"step {meta['step']} of {path}, {model.num_params():,} "
          f"params, {device}", file=sys.stderr)
    return generate(model, enc, args.prompt, num_sequences=args.num_samples,
                    max_new_tokens=args.max_new_tokens, top_k=args.top_k, seed=args.seed,
                    device=device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        texts = sample(args)
    except (ToolError, paths.PathError, CheckpointError, ExportError, TokenizerError,
            FileNotFoundError, ValueError) as e:
        print(f"dcp_train.sample: error: {e}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
