"""Text samples from the model, as in build-nanogpt: top-k 50 then multinomial sampling.

Safe to call from inside a training run, FSDP2 or not:
- the sampling RNG is a dedicated `torch.Generator` seeded with `seed + rank`, so each rank
  draws its own samples and the global torch RNG (part of the bit-exact resume) is untouched;
- exactly `max_new_tokens` forwards, no early stop at <|endoftext|>, so FSDP2 ranks stay in
  step;
- the context is cropped to the model's block_size before each forward.
- compiled blocks (--compile) run eagerly here (compiled.eager): each forward has a new length.

Padded vocabulary: the model's vocab (50304) is larger than GPT-2's (50257), and tiktoken cannot
decode the padded ids. Sampling only ever considers the first `enc.n_vocab` logits, so such ids
are never drawn, and `decode` drops any that appear in its input anyway.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcp_train.compiled import eager
from dcp_train.data.tokenizer import EOT
from dcp_train.train.evaluate import block_size_of, eval_mode


def decode(enc, tokens: list[int]) -> str:
    """tiktoken decode that drops ids outside the tokenizer's vocabulary (padded rows)."""
    return enc.decode([t for t in tokens if 0 <= t < enc.n_vocab])


def generate(model: nn.Module, enc, prompt: str, num_sequences: int = 4,
             max_new_tokens: int = 32, top_k: int = 50, seed: int = 42, rank: int = 0,
             device: torch.device | str = "cpu") -> list[str]:
    """`num_sequences` continuations of `prompt`, each `max_new_tokens` tokens, decoded.

    Every string starts with the prompt. An empty prompt starts from <|endoftext|>.
    """
    prompt_tokens = enc.encode(prompt) or [EOT]
    x = torch.tensor(prompt_tokens, dtype=torch.long, device=device)
    x = x.unsqueeze(0).repeat(num_sequences, 1)
    block_size = block_size_of(model) or x.size(1) + max_new_tokens
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + rank)
    with eval_mode(model), eager():  # a longer sequence each forward: no graph per length
        for _ in range(max_new_tokens):
            logits, _ = model(x[:, -block_size:])
            logits = logits[:, -1, :enc.n_vocab].float()
            probs = F.softmax(logits, dim=-1)
            topk_probs, topk_indices = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
            choice = torch.multinomial(topk_probs, 1, generator=generator)
            x = torch.cat((x, torch.gather(topk_indices, -1, choice)), dim=1)
    return [decode(enc, row) for row in x.tolist()]
