"""Loading a checkpoint into the components, verifying it as it loads.

Reading every byte of a checkpoint only to check it would double the cost of a resume. So
discovery (layout.py, `defer=True`) checks everything but the checksums of the shard
files, and `load` checks those on the bytes DCP reads anyway (dcp_io.py): each rank
checksums the files it reads half or more of (at the saved world size, its own shard files:
every file) while DCP reads them, locally piece by piece, from object stores each file as it
arrives whole. The files no rank read that much of (only after a change of world size) are
checked after the load, each rank a share of about equal bytes. On object stores `.metadata`
comes with `found` (read and checked once, by rank 0, at discovery) and file sizes from the
manifest: a rank's requests are the ranged GETs of the files it reads. Damage found this way is
returned, not raised: the manager then loads the next checkpoint discovery offers (the state
read from the damaged one is overwritten) or stops, for a checkpoint the user named.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_train import distributed as D
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.io.names import METADATA
from dcp_train.checkpoint.layout import Found
from dcp_train.checkpoint.ride_out import guarded, trouble
from dcp_train.errors import CheckpointError, describe
from dcp_train.job.progress import received_bytes


def load(found: Found, storage: Storage, shared: list, entry, verify: bool, rank: int,
         world_size: int, mine: Optional[list] = None) -> Optional[str]:
    """Collective: load `shared` components (every rank's) and, at the saved world size,
    `entry` (this rank's RankEntry) from `found`, read through `storage` (the Storage of the
    directory view that found it: no Storage is opened per load); with `verify`, check every
    file's checksum (see the module docstring; of the files no rank checked while loading, this
    rank checks a share, or those of them that `mine` names: the local tier's ranks check what
    they wrote, tiers/local.py). Returns None, or what is damaged (then the components hold
    whatever was read).
    Any other failure is one CheckpointError on every rank; a store outage (a transient store
    error, ride_out.py) is one StoreTrouble on every rank, never taken for damage."""
    reader = storage.dcp_reader(found.path, found.sizes, found.metadata)
    # a bytes bar at a terminal, for the files a remote reader fetches whole (job/progress.py)
    reader.downloading = lambda nbytes: received_bytes("checkpoint download", nbytes, rank)
    if verify:
        reader.verify_with(found.checksum, mine)

    def load_and_check() -> tuple:
        try:
            load_into(reader, shared, entry)
        except (Exception, CheckpointException) as e:  # on every rank: a collective load
            if trouble(e) is not None:  # a store outage, not damage: the caller rides it out
                raise trouble(e) from e
            return f"loading {found.path} failed: {describe(e)}", reader.digests
        return None, reader.digests

    gathered = D.agree(load_and_check, every_rank=True)
    problems = []
    if verify:
        problems = _check_rest(storage, found, [d for _, d in gathered], rank, world_size, mine)
    if problems:  # damage explains a failed load too
        return "; ".join(problems)
    errors = [err for err, _ in gathered if err]
    if errors:
        raise CheckpointError(errors[0])
    return None


def _check_rest(storage: Storage, found: Found, digests: list[dict], rank: int,
                world_size: int, mine: Optional[list]) -> list[str]:
    """Compare the checksums the ranks computed while loading (`digests`, every rank's), then
    check the files none of them computed, each rank a share (or the ones in `mine`), but
    `.metadata`: whoever chose `found` checked it (CheckpointDir.check, LocalTier.usable).
    Collective."""
    seen = {n: v for d in digests for n, v in d.items()}
    problems = [M.corrupt_line(n, value, found.files[n])
                for n, (size, value) in sorted(seen.items())
                if [size, value] != [found.files[n]["size"], M.digest(found.files[n])[1]]]
    rest = {n: v for n, v in found.files.items() if n not in seen and n != METADATA}
    names = share(rest, world_size)[rank] if mine is None else [n for n in mine if n in rest]
    gathered = D.agree(guarded(lambda: M.corrupt(storage, found.path,
                                                 {n: rest[n] for n in names})), every_rank=True)
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
