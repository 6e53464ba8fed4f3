"""Free space is checked before a local save writes anything.

A save that does not fit would fail half-way (torch's writer then reports "unexpected pos 704
vs 598", not "disk full") after filling the disk. So before dcp.save every rank states the
bytes it is about to write (`estimate`: the tensor data of its state dict plus DCP's overhead
per entry, torch.save's archive and the .metadata record) and the free bytes of the
checkpoint dir's filesystem as statvfs reports them on its host.
`room_problem` gathers both from every rank (one small all-gather) and compares, per host,
the sum of that host's ranks with the least free space any of them sees; every rank computes
the same answer from the same gathered list, so all refuse together or none does.

Per host, because ranks of one host share its disks; ranks on other hosts write to a shared
filesystem (counted once per host: the check can miss a shortfall there, never invent one) or
to their own node-local one. Object stores report no free space: no check, and a failure
while writing is named by errors.describe.
"""

from __future__ import annotations

import functools
import io
import socket

import torch

from dcp_train.errors import free_bytes, no_space_line

METADATA_PER_ENTRY = 256  # DCP's .metadata per entry (measured: 50 KB for 208 entries)
FIXED_ALLOWANCE = 16 * 1024  # .metadata header, manifest.json, `latest`, the lease


@functools.cache
def entry_overhead() -> int:
    """Bytes a save needs per state dict entry beyond its data: DCP writes every tensor with
    torch.save (a small zip archive: ~1.5 KB of headers and padding, measured here at import
    of this torch) plus its .metadata record."""
    buf = io.BytesIO()
    torch.save(torch.zeros(1), buf)
    return len(buf.getvalue()) - 4 + METADATA_PER_ENTRY


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's part of a tensor (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def save_bytes(state_dict) -> tuple[int, int]:
    """(tensor bytes, entries) this rank writes for `state_dict` (nested dicts/lists)."""
    total = entries = 0
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack += list(obj)
        elif isinstance(obj, torch.Tensor):
            total, entries = total + tensor_bytes(obj), entries + 1
        else:
            entries += 1  # a plain value: pickled into a small bytes entry
    return total, entries


def estimate(state_dict) -> int:
    """Bytes this rank's part of a save needs on disk (see the module docstring)."""
    data, entries = save_bytes(state_dict)
    return data + entries * entry_overhead()


def shortfall(path: str, per_rank: list[tuple[str, int, int | None]]) -> str | None:
    """The one-line refusal, or None: per_rank is [(host, bytes needed, free bytes or None)]
    of every rank. Pure (the same answer on every rank)."""
    hosts: dict[str, list] = {}
    for host, need, free in per_rank:
        hosts.setdefault(host, []).append((need, free))
    for host, items in sorted(hosts.items()):
        frees = [free for _, free in items if free is not None]
        if not frees:
            continue
        need = sum(n for n, _ in items) + FIXED_ALLOWANCE
        if need > min(frees):
            where = path if len(hosts) == 1 else f"{path} on {host}"
            return no_space_line(where, need, min(frees))
    return None


def room_problem(path: str, state_dict) -> str | None:
    """Collective (every rank, before dcp.save): the refusal line if the save clearly does
    not fit into local `path`, else None; the same answer on every rank."""
    from dcp_train import distributed as D

    if "://" in path and not path.startswith("file://"):
        return None  # the same on every rank: object stores report no free space
    mine = (socket.gethostname(), estimate(state_dict), free_bytes(path))
    return shortfall(path, D.agree(lambda: mine, every_rank=True))
