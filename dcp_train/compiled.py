"""torch.compile of the transformer blocks (the torchtitan way), TF32, and eager evaluation.

`compile_blocks(model)` compiles each transformer block in place (`nn.Module.compile`, before
fully_shard, as torchtitan does): the blocks are identical, so Dynamo/Inductor compile one
graph that all of them reuse; embeddings, the head and FSDP2's all-gather/reshard boundaries
stay outside the compiled regions. Compiling in place keeps every parameter's name, so a
checkpoint written with --compile loads without it and the other way round.

`dynamic=False`: a block is only ever run with the shapes it was compiled for. A new shape
(an eval batch of another size) compiles a graph of its own instead of replacing the training
graph by a dynamic-shape one, so the kernels of a training step never depend on what ran
before it, which is what a bit-exact resume needs.

`eager()` runs compiled modules as plain eager code inside it: text samples (a sequence that
grows by one token per forward) and HellaSwag (a different length per example) would
otherwise compile a graph per length.

`resolve(flag, device_type)`: --compile auto is on for CUDA, off for CPU (compiling costs
seconds to minutes at start; on CPU the gain is small).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def resolve(flag: bool | None, device_type: str) -> bool:
    """--compile true/false as given; None (auto): on for CUDA, off elsewhere."""
    return device_type == "cuda" if flag is None else flag


def configure_device(device_type: str) -> None:
    """TF32 for the fp32 matmuls left on CUDA (bf16 autocast/FSDP compute is unaffected)."""
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")


def compile_blocks(blocks: nn.ModuleList) -> None:
    """Compile each module of `blocks` in place: one full graph per block, static shapes."""
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False)


def eager():
    """Context manager: everything compiled runs as plain eager code inside it."""
    return torch.compiler.set_stance("force_eager")
