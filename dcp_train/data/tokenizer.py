"""The GPT-2 tokenizer through tiktoken, with a clear way out on machines without internet.

tiktoken's `r50k_base` encoding has exactly GPT-2's BPE ranks, pattern and `<|endoftext|>`
(50256), and needs one file (tiktoken's `gpt2` needs two more), so we use it. Where it comes from:

1. `--tokenizer_file PATH` (or `DCP_TRAIN_TOKENIZER_FILE`): a local `r50k_base.tiktoken` /
   `gpt2.tiktoken` ranks file, loaded with tiktoken's own `load_tiktoken_bpe`;
2. otherwise tiktoken's normal path: its cache (`TIKTOKEN_CACHE_DIR`, which tests and CI point
   at `../shared/tiktoken_cache`) or a download on first use.

With neither file nor internet this raises TokenizerError with what to do.
"""

from __future__ import annotations

import functools
import os

import tiktoken

EOT = 50256  # <|endoftext|>
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(RuntimeError):
    pass


@functools.lru_cache(maxsize=4)
def get_tokenizer(tokenizer_file: str = "") -> tiktoken.Encoding:
    path = tokenizer_file or os.environ.get("DCP_TRAIN_TOKENIZER_FILE", "")
    if path:
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path!r} does not exist")
        ranks = tiktoken.load.load_tiktoken_bpe(path)
        return tiktoken.Encoding(name="r50k_base", pat_str=_PAT, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises requests/urllib errors when offline
        raise TokenizerError(
            "cannot load the GPT-2 tokenizer (tiktoken r50k_base): it is not in tiktoken's cache "
            f"and could not be downloaded ({type(e).__name__}). Point --tokenizer_file (or "
            "DCP_TRAIN_TOKENIZER_FILE) at a local r50k_base.tiktoken/gpt2.tiktoken file, or "
            "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached copy") from None
