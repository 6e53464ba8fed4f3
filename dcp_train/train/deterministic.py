"""--deterministic: the same bits on every world size that divides a step's micro-batches.

Contract. For a given seed, data, --total_batch_size, --seq_len and --batch_size (and the
other flags, one machine type, one torch build), every step's loss and grad norm and the model
and optimizer state after it are bit-identical whether the run uses 1, 2, 3, 4, 6, ... ranks
(any world size W that divides V, below) and whatever world sizes it was stopped and resumed
at. How one step runs in this mode:

1. Fixed decomposition. A step is V = samples_per_step / batch_size global micro-batches of
   --batch_size sequences. Rank r runs micro-batches [r*V/W, (r+1)*V/W): exactly the
   contiguous slice of the step that its loader yields (data/sampler.py).
2. A plain replica. Parameters and optimizer state stay sharded by fully_shard (DTensors;
   checkpoints are unchanged), but the forward/backward runs on a non-FSDP copy of the model
   (the same GPT code) into which the full parameters are all-gathered (a copy: exact). Every
   micro-batch has the same shapes on every rank.
3. Rank-free randomness. Before micro-batch i's forward, torch's generators are seeded from
   (seed, step, i): dropout masks depend on nothing else.
4. Exact sums (`exact_sum`). Per parameter, M = max |g| over all V micro-batch gradients
   (all-reduce MAX: exact), a power-of-two scale 2^S with V * M * 2^S < 2^62, each micro-batch
   gradient rounded to the int64 round(g * 2^S) (a function of g and M only), an int64 sum
   over local micro-batches and an all-reduce SUM over ranks (integer sums are exact in any
   order), then total * 2^-S / V. Every rank gets the same full mean gradient, the same
   bits on every world size. Elements below M * 2^-(61 - log2 V) count as 0.
5. The global norm and the clip are computed on the full gradient (same tensors, same kernels
   on every rank); each FSDP parameter gets its shard as .grad and optimizer.step() runs on the
   shards. AdamW's update is elementwise; tests/test_deterministic.py checks that the
   implementation in use (single-tensor on CPU, fused on CUDA) gives an element the same bits
   wherever the shard boundaries fall.
6. The logged loss is the mean of the V micro-batch losses, summed in global index order.
7. Kernels: one intra-op thread on CPU; torch.use_deterministic_algorithms(True) and
   CUBLAS_WORKSPACE_CONFIG on CUDA.

Cost: per step an all-gather of the parameters, an int64 all-reduce of the full gradient (twice
the bytes of fp32) instead of a reduce-scatter, a full model replica per rank, and this rank's
V/W micro-batch gradients held until the step's sum (V/W full fp32 gradients of memory).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from dcp_train.config import Config
from dcp_train.errors import ConfigError
from dcp_train.model import GPT


def micro_batches_per_step(cfg: Config) -> int:
    """V: the global micro-batches of --batch_size sequences in one step."""
    samples = cfg.training.total_batch_size // cfg.training.seq_len
    if samples % cfg.training.batch_size:
        raise ConfigError(f"--deterministic needs the {samples} samples of a step "
                          f"(--total_batch_size/--seq_len) to be a multiple of --batch_size "
                          f"{cfg.training.batch_size}; change --batch_size or --total_batch_size")
    return samples // cfg.training.batch_size


def setup(cfg: Config, world_size: int, device_type: str) -> None:
    """Refuse a world size that does not divide V (before anything is written), then pin the
    kernels: one CPU intra-op thread; deterministic algorithms on CUDA."""
    t = cfg.training
    v = micro_batches_per_step(cfg)
    if v % world_size:
        works = ", ".join(str(w) for w in range(1, v + 1) if v % w == 0)
        raise ConfigError(f"--deterministic splits each step into {v} micro-batches of "
                          f"--batch_size {t.batch_size}, which world size {world_size} does "
                          f"not divide; run on {works} ranks, or change --batch_size")
    if device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    else:
        torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def check_resume(saved_config: dict, cfg: Config) -> None:
    """The mode cannot be switched on or off on resume, and in the mode --batch_size (which
    fixes the decomposition) cannot change."""
    saved = bool(saved_config.get("deterministic", False))
    if saved != cfg.training.deterministic:
        raise ConfigError(f"the checkpoint was written {'with' if saved else 'without'} "
                          f"--deterministic; resume it {'with' if saved else 'without'} the "
                          "flag, or start a new run in another --checkpoint_dir")
    if saved and saved_config["batch_size"] != cfg.training.batch_size:
        raise ConfigError(f"the checkpoint was written with --deterministic --batch_size "
                          f"{saved_config['batch_size']}; keep that --batch_size (it fixes the "
                          "micro-batches whose bits the mode reproduces)")


def micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of global micro-batch `index` of step `step` (63 bits)."""
    state = np.random.SeedSequence([seed, step, index, 0xDE7]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def _scale_exponent(max_abs: float, total_micro: int) -> int | None:
    """S with total_micro * max_abs * 2^S < 2^62; None for an all-zero or non-finite tensor."""
    if max_abs == 0.0 or not math.isfinite(max_abs):
        return None
    exponent = math.frexp(max_abs)[1]  # max_abs < 2^exponent
    return 61 - (total_micro - 1).bit_length() - exponent


def exact_sum(local: list[list[torch.Tensor]], total_micro: int) -> list[torch.Tensor]:
    """Mean over all ranks' micro-batch gradients, bit-identical however the `total_micro`
    micro-batches are split over ranks. local[k][j]: this rank's k-th micro-batch gradient of
    parameter j (the same parameter list on every rank). Returns fp32 tensors; a parameter
    with a non-finite gradient anywhere gets NaN. Collective: every rank calls it."""
    n = len(local[0])
    maxes = torch.stack([torch.stack([g[j].detach().abs().max().float() for g in local]).max()
                         for j in range(n)])
    maxes = torch.nan_to_num(maxes, nan=math.inf)  # MAX may drop a NaN; inf survives it
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    shifts = [_scale_exponent(m, total_micro) for m in maxes.tolist()]
    ints = []
    for j, s in enumerate(shifts):
        acc = torch.zeros(local[0][j].numel(), dtype=torch.int64, device=local[0][j].device)
        if s is not None:
            for g in local:  # g * 2^s is exact in float64; round() depends on g and s only
                acc += torch.round(g[j].detach().double().flatten() * 2.0 ** s).to(torch.int64)
        ints.append(acc)
    flat = torch.cat(ints)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # integers: exact in any order
    out = []
    for j, total in enumerate(flat.split([t.numel() for t in ints])):
        s, like = shifts[j], local[0][j]
        if s is None:
            value = torch.full_like(like, 0.0 if maxes[j] == 0 else math.nan, dtype=torch.float32)
        else:
            value = (total.double() * 2.0 ** -s / total_micro).float().view_as(like)
        out.append(value)
    return out


class DeterministicStep:
    """One optimizer step of --deterministic mode (see the module doc). Holds the replica."""

    def __init__(self, cfg: Config, model: torch.nn.Module, rank: int, world_size: int,
                 device: torch.device):
        self.cfg, self.device = cfg, device
        self.total = micro_batches_per_step(cfg)
        self.per_rank, self.first = self.total // world_size, rank * self.total // world_size
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as FSDP's policy
        with torch.random.fork_rng(devices=[]):  # the replica's init values are never used
            self.replica = GPT(cfg.model).to(device=device, dtype=dtype)
        self.sharded = [p for _, p in model.named_parameters()]
        self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        names = [n for n, _ in model.named_parameters()]
        assert names == [n for n, _ in self.replica.named_parameters()], "replica differs"

    def _load_replica(self) -> None:
        """Full parameters into the replica (all-gather: a copy, exact). First the FSDP model
        is resharded: an evaluation's forward (no backward) leaves FSDP2's root parameters
        unsharded, and its next forward would use them, stale, after this step's update."""
        for module in self.fsdp_modules:
            module.reshard()
        with torch.no_grad():
            for p, r in zip(self.sharded, self.replica.parameters()):
                r.copy_(p.full_tensor() if isinstance(p, DTensor) else p)

    def _micro_batches(self, batches, step: int, sample_ids: list):
        """This rank's micro-batch gradients and losses, each from its own seeded stream."""
        grads, losses = [], []
        params = list(self.replica.parameters())
        self.replica.train()
        for k in range(self.per_rank):
            ids, x, y = next(batches)
            sample_ids += ids.tolist()
            torch.manual_seed(micro_seed(self.cfg.training.seed, step, self.first + k))
            _, loss = self.replica(x.to(self.device), y.to(self.device))
            loss.backward()
            grads.append([p.grad for p in params])
            for p in params:
                p.grad = None
            losses.append(loss.detach().float())
        return grads, losses

    def _gathered_loss(self, losses: list[torch.Tensor]) -> float:
        local = torch.stack(losses)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return sum(torch.cat(parts).tolist()) / self.total  # in global micro-batch order

    def __call__(self, optimizer, batches, step: int, lr: float) -> tuple[float, float, list]:
        """Forward/backward this rank's micro-batches of step `step`, exact gradient sum, clip,
        optimizer.step() at `lr` on the shards. Returns (loss, grad norm before clipping, this
        rank's sample ids), as train.train_step."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        sample_ids = []
        self._load_replica()
        grads, losses = self._micro_batches(batches, step, sample_ids)
        full = exact_sum(grads, self.total)
        norm = torch.nn.utils.get_total_norm(full)
        coef = torch.clamp(self.cfg.training.grad_clip / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
        torch._foreach_mul_(full, coef)
        for p, g in zip(self.sharded, full):
            g = g.to(p.dtype)
            p.grad = (distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) else g)
        optimizer.step()
        return self._gathered_loss(losses), norm.item(), sample_ids
