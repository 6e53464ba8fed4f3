"""Distribution setup in one place: process group, device, mesh, FSDP2 wrapping, collectives.

Runs under torchrun (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and also as a
single plain process (`python -m dcp_train.main`), which becomes a world of one on 127.0.0.1.
CPU uses gloo; CUDA uses nccl for GPU tensors plus gloo for CPU tensors (object broadcasts and
checkpoint coordination), so the same code path runs on both.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dcp_train.compiled import compile_blocks, configure_device
from dcp_train.errors import chain, one_line


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str = "auto", timeout_s: float = 300) -> DistInfo:
    """Initialise the process group and a 1-D device mesh over all ranks. ConfigError (before
    anything starts) for --device cuda without CUDA.

    timeout_s (--stall_timeout) bounds every collective: on gloo (CPU, and the CPU group of
    `agree` on CUDA) a collective whose peer does not answer raises after timeout_s
    (`timed_out`; tests/test_stalls.py checks it with a SIGSTOPped rank). On CUDA the same
    timeout goes to nccl's watchdog; unless already set, TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (nccl's
    watchdog ends the process on a timed-out collective instead of leaving it hung; torch's
    own default in recent releases, set so that an older default or launcher does not
    differ) and TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=timeout_s (the monitor that ends a
    process whose watchdog itself hangs; torch's default is 480 s) are set for it. Where the
    wait for a stopped peer is a gloo collective (`agree`'s per-step gather, a save's), the
    stalled rank is named (job/stall.py); where it is a GPU sync behind an nccl collective
    (a loss's `.item()`), only nccl's watchdog sees it, and it ends the waiting process with
    nccl's own message after timeout_s: the job still ends, without our line naming the rank.
    Not tested: no machine here has two GPUs."""
    if "RANK" not in os.environ:  # a plain `python -m dcp_train.main`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from dcp_train.errors import ConfigError
            raise ConfigError("--device cuda was given but CUDA is not available (torch "
                              f"{torch.__version__}, torch.cuda.is_available() is False); use "
                              "--device cpu or --device auto")
        torch.cuda.set_device(local_rank)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(max(1, round(timeout_s))))
        dev, backend = torch.device("cuda", local_rank), "cpu:gloo,cuda:nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            store=attempt_store(rank, world_size, timeout_s),
                            rank=rank, world_size=world_size,
                            device_id=dev if dev.type == "cuda" else None)
    _TIMEOUT[0] = timedelta(seconds=timeout_s)
    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    return DistInfo(rank, world_size, local_rank, dev, mesh)


ATTEMPTS_KEY = "dcp_train/attempts"


def attempt_store(rank: int, world_size: int, timeout_s: float):
    """The store the process group is built on: torch's own env:// store (the one torchrun
    shares with its workers, or rank 0's own), under a prefix of this attempt of the job,
    `dcp_train/attempt_<n>/`.

    Why: torch 2.13's torchrun keeps one TCPStore for every attempt (the static rendezvous's
    store; with c10d rendezvous the store its agents share with the workers unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and the process group's keys (gloo's and NCCL's
    addresses, the init barrier) are the same words in every attempt: a restarted attempt
    reads the dead attempt's addresses and fails ("Gloo connectFullMesh failed ... Connection
    refused") or hangs. TORCHELASTIC_RESTART_COUNT cannot name the attempt: it counts the
    restarts of one agent, and a relaunched node's agent starts again from 0.

    `n` is agreed through the store itself (`_agree_attempt`), so every rank of this attempt
    has the same one whatever the store holds from earlier attempts; the heartbeats and
    failure keys of job/ live under the same prefix (the default store), so they are per
    attempt too. Bounded: a rank that does not arrive within timeout_s (--stall_timeout) is a
    RuntimeError naming it."""
    base, _, _ = next(dist.rendezvous("env://", rank, world_size,
                                      timeout=timedelta(seconds=timeout_s)))
    base.set_timeout(timedelta(seconds=timeout_s))
    n = _agree_attempt(base, rank, world_size, time.monotonic() + timeout_s, timeout_s)
    return dist.PrefixStore(f"dcp_train/attempt_{n}", base)


def _agree_attempt(store, rank: int, world_size: int, deadline: float, timeout_s: float) -> int:
    """This attempt's number, the same on every rank. Rank 0 takes a new number (an atomic
    add: no two attempts share one); every other rank posts a fresh nonce, and accepts the
    number only from an answer that carries its own nonce (so never a dead attempt's);
    rank 0 answers every nonce it sees until each rank has confirmed under the new number."""
    if rank == 0:
        n = int(store.add(ATTEMPTS_KEY, 1))
        pending, answered = set(range(1, world_size)), {}
        while pending:
            for r in sorted(pending):
                if store.check([f"{ATTEMPTS_KEY}/{n}/joined/{r}"]):
                    pending.discard(r)
                elif store.check([f"{ATTEMPTS_KEY}/hello/{r}"]):
                    nonce = store.get(f"{ATTEMPTS_KEY}/hello/{r}").decode()
                    if answered.get(r) != nonce:
                        store.set(f"{ATTEMPTS_KEY}/answer/{r}", f"{nonce} {n}")
                        answered[r] = nonce
            _wait_or_fail(deadline, timeout_s, sorted(pending) if pending else None)
        return n
    nonce = uuid.uuid4().hex
    store.set(f"{ATTEMPTS_KEY}/hello/{rank}", nonce)
    key = f"{ATTEMPTS_KEY}/answer/{rank}"
    while True:
        if store.check([key]):
            got, n = store.get(key).decode().split()
            if got == nonce:
                store.set(f"{ATTEMPTS_KEY}/{n}/joined/{rank}", "1")
                return int(n)
        _wait_or_fail(deadline, timeout_s, [0])


def _wait_or_fail(deadline: float, timeout_s: float, missing: list[int] | None) -> None:
    if missing is None:
        return
    if time.monotonic() > deadline:
        who = ", ".join(f"rank {r}" for r in missing)
        raise RuntimeError(f"{who} did not join the process group within {timeout_s:g} s "
                           "(--stall_timeout)")
    time.sleep(0.01)


def device_name(info: DistInfo) -> str:
    """The accelerator's name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    if info.device_type == "cuda":
        return torch.cuda.get_device_name(info.device)
    return info.device_type


def teardown(clean: bool = True) -> None:
    """Destroy the process group. After a clean run all ranks first meet at a barrier, so no
    rank exits while another is still talking to it (gloo aborts the process otherwise)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def shard_model(model: nn.Module, info: DistInfo, compile: bool = False) -> nn.Module:
    """FSDP2: fully_shard every transformer block, then the root, on the explicit mesh.

    bf16 parameters/compute with fp32 gradient reduction on CUDA; plain fp32 on CPU. With
    `compile`, each block is torch.compile'd in place first (compiled.py), as torchtitan does.
    """
    configure_device(info.device_type)
    if compile:
        compile_blocks(model.transformer.h)
    if info.device_type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    model.to(info.device)
    for block in model.transformer.h:
        fully_shard(block, mesh=info.mesh, mp_policy=mp)
    fully_shard(model, mesh=info.mesh, mp_policy=mp)
    return model


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (SUM then divide: gloo has no AVG)."""
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def agree(fn, *, every_rank: bool = False):
    """The one way ranks agree on a decision or a failure.

    every_rank=False: fn() runs on rank 0 only and every rank returns rank 0's result.
    every_rank=True: fn() runs on every rank and every rank returns the list of all results
    (index = rank). If fn() raised (an Exception) on any rank, every rank raises the same
    exception instead: the lowest failing rank's, same type and message, so all ranks stop
    together with the same words and none is left waiting in a collective; its
    `origin_rank` attribute names that rank (rank 0 without every_rank), the one that
    prints it (failure.leave). Without an
    initialised process group this is a world of one. Collective over the CPU group, so every
    rank must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        result = fn()
        return [result] if every_rank else result
    outcome = None
    if every_rank or dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:
            if timed_out(e):  # a peer that did not answer there will not answer here
                raise
            outcome = (False, _portable(e))
    group = _cpu_group()
    if every_rank:
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, outcome, group=group)
    else:
        box = [outcome]
        dist.broadcast_object_list(box, src=0, group=group)
        outcomes = box
    for rank, (ok, value) in enumerate(outcomes):  # without every_rank: [rank 0's]
        if not ok:
            if getattr(value, "origin_rank", None) is None:  # an inner agree's stands
                value.origin_rank = rank  # the rank whose line it is (failure.py)
            raise value
    values = [value for _, value in outcomes]
    return values if every_rank else values[0]


def _portable(e: Exception) -> Exception:
    """`e` if it survives pickling (to reach the other ranks), else a RuntimeError with its
    first line (e.g. a botocore error holding a socket)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(one_line(e))


_TIMEOUT_TEXT = ("Timed out waiting", "Application timeout caused pair closure")


def timed_out(exc: BaseException) -> bool:
    """A collective (or one wrapped in a CheckpointError/DCP exception) gave up because a peer
    did not answer within the process group's timeout: gloo's words for it."""
    return any(t in str(e) for e in chain(exc) for t in _TIMEOUT_TEXT)


def barrier() -> None:
    dist.barrier(group=_cpu_group())


_CPU_GROUP = None
_TIMEOUT = [None]  # setup's timeout, for the CPU group


def _cpu_group():
    """A gloo group for CPU-side coordination (the default group already is gloo on CPU)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = (dist.group.WORLD if dist.get_backend() == "gloo"
                      else dist.new_group(backend="gloo", timeout=_TIMEOUT[0]))
    return _CPU_GROUP
