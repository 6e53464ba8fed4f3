"""Loading a checkpoint into the components, with its verification running at the same time.

Reading every byte of a checkpoint only to check it would double the cost of a resume. So
discovery (layout.py, `defer=True`) checks everything but the CRC-32s of the shard
files, and `load` checks those without a second pass where it can:
- local: on a background thread while DCP reads the same files (the page cache serves both),
  each rank a share of about equal bytes;
- object stores: a file a rank needs most of is fetched whole and checksummed on arrival
  (dcp_io.py; at the saved world size, every shard file); after the load the others are
  checked, each rank a share of about equal bytes (a second download of those only).
  `.metadata` comes with `found` (read and checked once, by rank 0, at discovery) and file
  sizes from the manifest: a rank's requests are the ranged GETs of the files it reads. Damage found this way is returned,
not raised: the manager then loads the next checkpoint discovery offers (the state read from
the damaged one is overwritten) or stops, for a checkpoint the user named.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_train import distributed as D
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.layout import METADATA, Found
from dcp_train.errors import CheckpointError, describe


def load(found: Found, storage_options: dict, shared: list, entry, verify: bool,
         rank: int, world_size: int, mine: Optional[list] = None) -> Optional[str]:
    """Collective: load `shared` components (every rank's) and, at the saved world size,
    `entry` (this rank's RankEntry) from `found`; with `verify`, check every file's CRC-32
    (see the module docstring; on a local dir, this rank checks a share of the files, or the
    files `mine` names: the local tier's ranks check what they wrote, tiers/local.py). Returns None,
    or what is damaged (then the components hold whatever was read). Any other failure is one
    CheckpointError on every rank."""
    storage = Storage(found.path, storage_options)
    reader = storage.dcp_reader(found.path, found.sizes, found.metadata)
    during = verify and storage.is_local  # local: check a share while DCP reads
    names = share(found.files, world_size)[rank] if mine is None else mine

    def load_and_check() -> tuple:
        checked = {n: found.files[n] for n in names}
        with ThreadPoolExecutor(1, thread_name_prefix="dcp_train-verify") as pool:
            checking = pool.submit(M.corrupt, storage, found.path, checked) if during else None
            error = None
            try:
                load_into(reader, shared, entry)
            except (Exception, CheckpointException) as e:  # on every rank: a collective load
                error = f"loading {found.path} failed: {describe(e)}"
            try:
                problems = checking.result() if checking is not None else []
            except Exception as e:
                problems, error = [], error or f"verifying {found.path} failed: {describe(e)}"
        return problems, error, getattr(reader, "fetched", {})

    gathered = D.agree(load_and_check, every_rank=True)
    problems = sorted(p for ps, _, _ in gathered for p in ps)
    if verify and not during:
        problems += _check_rest(storage, found, [f for _, _, f in gathered], rank, world_size)
    if problems:  # damage explains a failed load too
        return "; ".join(problems)
    errors = [err for _, err, _ in gathered if err]
    if errors:
        raise CheckpointError(errors[0])
    return None


def _check_rest(storage: Storage, found: Found, fetched: list[dict], rank: int,
                world_size: int) -> list[str]:
    """Remote: the files some rank fetched whole were checksummed on arrival (dcp_io.py),
    `.metadata` at discovery (found.metadata); compare those, then check the others, each rank
    a share. Collective."""
    seen = {n: v for f in fetched for n, v in f.items()}
    problems = [M.corrupt_line(n, crc, found.files[n]["crc32"])
                for n, (_, crc) in sorted(seen.items()) if crc != found.files[n]["crc32"]]
    rest = {n: v for n, v in found.files.items() if n not in seen and not (
        n == METADATA and found.metadata is not None)}
    mine = {n: rest[n] for n in share(rest, world_size)[rank]}
    gathered = D.agree(lambda: M.corrupt(storage, found.path, mine), every_rank=True)
    return problems + sorted(p for ps in gathered for p in ps)


def load_into(reader, shared: list, entry=None) -> None:
    """Load `shared` components (and `entry`, if given) from a DCP reader, in place."""
    sd = {}
    for component in shared:
        sd.update(component.state_dict())  # templates: DCP loads in place, resharding
    metadata = reader.read_metadata()
    if entry is not None:
        prefix = entry.key + "."
        sd[entry.key] = {k[len(prefix):]: _template(metadata, k)
                         for k in metadata.state_dict_metadata if k.startswith(prefix)}
    for key, value in sd.items():  # JSON entries (uint8): their size is the saved one
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            sd[key] = _template(metadata, key)
    dcp.load(sd, storage_reader=reader)
    for component in shared:
        component.load_state_dict(sd)
    if entry is not None:
        entry.load_state_dict(sd)


def _template(metadata, key: str) -> torch.Tensor:
    md = metadata.state_dict_metadata[key]
    return torch.empty(md.size, dtype=md.properties.dtype)


def share(files: dict, world_size: int) -> list[list[str]]:
    """Split the files of a step dir into `world_size` lists of about equal bytes (largest
    first, each to the least loaded rank); the same answer on every rank."""
    shares, loads = [[] for _ in range(world_size)], [0] * world_size
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = loads.index(min(loads))
        shares[r].append(name)
        loads[r] += files[name]["size"]
    return shares
