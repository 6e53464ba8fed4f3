"""The local tier: checkpoints on node-local disk (--local_checkpoint_dir), one dir per node.

Layout: the same as a checkpoint dir (docs/design.md), per node. `{node}` in the path is
replaced by the node's rank (torchrun's GROUP_RANK), so several "nodes" on one machine (tests)
get their own dirs; two nodes that would share one dir on one host are refused.

    <local dir of node k>/
      latest
      step_00000006/   manifest.json (the whole checkpoint's: the same bytes the durable tier
                       gets), tier.json (see below), the DCP files this node's ranks wrote,
                       plus what they need of the others' to load at the same layout

A node holds only what its own ranks wrote. To load from it alone, a rank needs DCP's
`.metadata` (written by rank 0 only) and the entries DCP stores once for all ranks (it
dedups replicated tensors such as `meta` and the optimizer's `step`s onto one rank's file).
So after the write, every node whose ranks lack them gets a copy of `.metadata` and of those
entries' byte ranges (a few KB, sent over the collective) written into a sparse file of the
full size at the same offsets: DCP reads them where `.metadata` says. Sharded tensors and the
`rank_*` entries at the same world size are read from the rank's own file.

tier.json: {"nodes": node of every rank, "written": {rank: [files]}, "partial": {file:
[[offset, length, crc32]]}, "replicate": bool (meant for the durable tier)}.

Save: in this process, or with --async_checkpoint in the rank's save process (async_save/,
which builds its own LocalTier: in_save_process; the loop waits only for the staging copy).
The durable tier's save protocol (protocol.py, the same Checkpointer methods) on each
node's dir. Every rank, collective, failures agreed on: free space, a temp dir name from rank
0, dcp.save into `<own node dir>/<temp>`, the copies above; then each node's lowest rank runs
the protocol's commit over its node's files: checks the listing, writes tier.json and
manifest.json, renames the temp dir (the commit), replaces `latest` and applies retention,
which never removes a local step dir meant for the durable tier and newer than the durable
tier's newest checkpoint: it may be the only copy.

Resume: a rank can use local step s if its node dir holds it committed, saved with the same
node layout (and so the same world size), and its files (own, `.metadata`, partial ranges)
have the manifest's sizes and `.metadata`/partial checksums (its own shards' checksums are
checked while loading, restore.py). The step every rank can use is agreed on.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import zlib
from functools import partial

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_train import distributed as D
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.names import METADATA, TIER
from dcp_train.checkpoint.io.safe_metadata import load_metadata
from dcp_train.checkpoint.layout import CheckpointDir, Found
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.checkpoint.state import read_meta
from dcp_train.config import PLACEHOLDER, local_path
from dcp_train.errors import ConfigError, describe
from dcp_train.job import faults


def node_rank() -> int:
    """This process's node: torchrun's GROUP_RANK (its --node_rank), 0 outside torchrun."""
    return int(os.environ.get("GROUP_RANK", "0"))


def read_tier_info(step_dir: str) -> dict:
    """A local step dir's tier.json (what `commit` writes beside the manifest): the one reader,
    the tier's and dcp-ckpt's; OSError or ValueError when it is missing or damaged."""
    with open(os.path.join(step_dir, TIER)) as f:
        return json.load(f)


class LocalTier:
    def __init__(self, template: str, keep_last_n: int, rank: int, world_size: int,
                 save_process=None):
        """save_process: as Checkpointer's, for asynchronous local saves (the save process
        builds its own LocalTier: in_save_process)."""
        self.node, self.rank, self.world_size = node_rank(), rank, world_size
        self.root = local_path(template, self.node)
        self.dir = CheckpointDir(self.root)
        self.storage = self.dir.storage
        self.checkpointer = Checkpointer(
            self.dir, keep_last_n, words=_local_words, save_process=save_process,
            child=partial(in_save_process, template, keep_last_n, rank, world_size))
        self.nodes: list[int] = []

    def setup(self) -> None:
        """Collective: learn every rank's node; refuse two nodes sharing one dir on a host."""
        peers = D.agree(lambda: (self.node, socket.gethostname(), self.root), every_rank=True)
        owner = {}
        for node, host, root in peers:
            other = owner.setdefault((host, root), node)
            if other != node:
                raise ConfigError(f"nodes {other} and {node} share --local_checkpoint_dir {root}"
                                  f" on {host}; each node needs its own dir: put {PLACEHOLDER} "
                                  "in the path (replaced by the node rank)")
        self.nodes = [node for node, _, _ in peers]
        self.ranks = [r for r, n in enumerate(self.nodes) if n == self.node]
        self.leader = self.rank == self.ranks[0]

    @property
    def multi_node(self) -> bool:
        return len(set(self.nodes)) > 1

    # ------------------------------------------------------------------------ saving
    def save(self, step: int, state_dict: dict, replicate: bool, durable_step: int,
             asynchronous: bool = False, pending: list | None = None,
             t0: float | None = None) -> None:
        """Collective: save step `step` on the local tier (write_and_commit), in this process
        or (asynchronous) in the save process, through the protocol's Checkpointer.save (one
        save at a time, staging as for any async save). Its `checkpoint` record comes out of
        `self.checkpointer.records()` once committed. pending: the steps replication still has
        to copy (Replicator.steps()), which retention keeps (_keep_for_durable). t0: when
        the save was asked for (Checkpointer.save's); default now."""
        if asynchronous:
            self.checkpointer.save(step, state_dict, self.rank, self.world_size, asynchronous=True,
                               options={"replicate": replicate, "durable_step": durable_step,
                                        "pending": pending}, t0=t0)
        else:
            t0 = self.checkpointer.asked(step, t0)
            self.checkpointer.finished(self.write_and_commit(
                step, state_dict, self.rank, t0, replicate, durable_step, pending))

    def write_and_commit(self, step: int, state_dict: dict, rank: int, t0: float,
                         replicate: bool, durable_step: int, pending: list | None = None) -> dict:
        """Collective: write and commit step `step` into every node's dir with the save
        protocol (protocol.py; `rank` is self.rank, t0 when the save was asked for). Returns
        its `checkpoint` record, with per_rank: every rank's {file: [size, hex digest]}, and
        replicate: whether the durable tier is to get it."""
        faults.at_step(step)
        self.checkpointer.check_room(step, state_dict, what="local save of step")
        final = self.dir.step_path(step)
        # one temp name for every node (rank 0's), each node's dir its own
        target = self.storage.join(D.agree(
            lambda: posixpath.basename(self.checkpointer.target_dir(final))))
        per_rank = D.agree(lambda: self.checkpointer.write(step, state_dict, self.rank, target),
                           every_rank=True)
        copies = self._copies(target, per_rank) if self.multi_node else (None, {})
        D.agree(lambda: self._commit(step, target, final, per_rank, copies, replicate,
                                     durable_step, pending) if self.leader else None,
                every_rank=True)
        size, seconds = sum(s for d in per_rank for s, _ in d.values()), time.perf_counter() - t0
        return {"step": step, "path": final, "seconds": seconds, "bytes": size,
                "mb_per_s": size / seconds / 1e6, "tier": "local", "per_rank": per_rank,
                "replicate": replicate}

    def _copies(self, target: str, per_rank: list[dict]) -> tuple[bytes, dict]:
        """Collective: (.metadata's bytes, {(file, offset, length): bytes} of every entry
        stored once for all ranks), for the nodes that lack them."""
        def plan():
            with open(os.path.join(target, METADATA), "rb") as f:
                data = f.read()
            md = load_metadata(data, target)
            return data, sorted({(i.relative_path, i.offset, i.length)
                                 for idx, i in md.storage_data.items() if _shared(md, idx.fqn)})
        data, ranges = D.agree(plan)
        mine = per_rank[self.rank]

        def read() -> dict:
            out = {}
            for file, offset, length in ranges:
                if file in mine:
                    with open(os.path.join(target, file), "rb") as f:
                        f.seek(offset)
                        out[(file, offset, length)] = f.read(length)
            return out
        return data, {k: v for d in D.agree(read, every_rank=True) for k, v in d.items()}

    def _commit(self, step, target, final, per_rank, copies, replicate, durable_step,
                pending=None) -> None:
        """This node's lowest rank: the copies this node lacks, then the protocol's commit
        over this node's files, with tier.json and a retention that keeps what the durable
        tier still needs."""
        files = {n: v for d in per_rank for n, v in d.items()}
        own = {n for r in self.ranks for n in per_rank[r]}
        partial = self._write_copies(target, files, own, copies)
        listed = own | set(partial) | ({METADATA} if copies[0] else set())
        info = {"nodes": self.nodes, "replicate": replicate, "partial": partial,
                "written": {str(r): sorted(d) for r, d in enumerate(per_rank)}}
        self.checkpointer.commit(target, final, step, per_rank, rank=self.rank,
                             expected={n: files[n][0] for n in listed},
                             extra={TIER: json.dumps(info).encode()},
                             protect=self._keep_for_durable(durable_step, pending))

    def _write_copies(self, target, files, own, copies) -> dict:
        """Write `.metadata` and the shared entries' ranges this node lacks (sparse files of
        the full size); returns tier.json's `partial`."""
        data, pieces = copies
        if data is not None and METADATA not in own:
            with open(os.path.join(target, METADATA), "wb") as f:
                f.write(data)
        partial: dict[str, list] = {}
        for (file, offset, length), blob in sorted(pieces.items()):
            if file in own:
                continue
            path = os.path.join(target, file)
            with open(path, "r+b" if os.path.exists(path) else "wb") as f:
                f.truncate(files[file][0])
                f.seek(offset)
                f.write(blob)
            partial.setdefault(file, []).append([offset, length, f"{zlib.crc32(blob):08x}"])
        return partial

    def _keep_for_durable(self, durable_step: int, pending: list | None = None):
        """Retention's protect rule: never remove a dir meant for the durable tier that is
        newer than its newest checkpoint (`durable_step`) and that replication still has to
        copy (`pending`, Replicator.steps(): the job in flight and one waiting; None: every
        such dir). So the local tier holds at most keep + 2 checkpoints however long the
        bucket is down: a step replication skipped (a newer one superseded it) or gave up
        (past --store_retry_budget) is no longer pending, and goes at the next save, with
        the WARNING replication printed; the newest is always kept, and replicated later."""
        return lambda s, name: (s > durable_step and (pending is None or s in pending)
                                and self._meant(name))

    def _meant(self, name: str) -> bool:
        try:
            return bool(read_tier_info(self.storage.join(name)).get("replicate"))
        except (OSError, ValueError):
            return False

    # ------------------------------------------------------------------------ resuming
    def usable(self) -> dict[int, str | None]:
        """This rank: {committed local step: None if this rank can load it, else why not}."""
        committed, _ = self.dir.scan()
        return {s: self._problem(self.storage.join(name)) for s, name in committed.items()}

    def _problem(self, path: str) -> str | None:
        try:
            info, files = read_tier_info(path), M.read(self.storage, path)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable ({describe(e)})"
        if info.get("nodes") != self.nodes:
            return (f"saved by ranks on nodes {info.get('nodes')}, this run's are {self.nodes} "
                    "(another world size or node layout)")
        need = set(info["written"][str(self.rank)]) | {METADATA} | set(info["partial"])
        for n in sorted(need):
            path_n = os.path.join(path, n)
            if not os.path.exists(path_n) or os.path.getsize(path_n) != files[n]["size"]:
                return f"file {n} is missing or has the wrong size"
        checksum, expected = M.digest(files[METADATA])
        if M.hash_file(self.storage, os.path.join(path, METADATA), checksum)[1] != expected:
            return f"file {METADATA} is corrupt"
        for n, ranges in info["partial"].items():
            with open(os.path.join(path, n), "rb") as f:
                for offset, length, crc in ranges:
                    f.seek(offset)
                    if f"{zlib.crc32(f.read(length)):08x}" != crc:
                        return f"the copied entries of {n} are corrupt"
        return None

    def found(self, step: int) -> Found:
        """Local step `step` of this rank's node, to resume from."""
        path = self.dir.step_path(step)
        return Found(path=path, step=step, meta=read_meta(self.storage.dcp_reader(path)),
                     files=M.read(self.storage, path)["files"])

    def unreplicated(self, found: Found, durable_step: int) -> list | None:
        """Every rank's {file: [size, hex digest]} of local checkpoint `found` if it was meant
        for the durable tier and is newer than its newest (`durable_step`), else None."""
        info = read_tier_info(found.path)
        if not info.get("replicate") or found.step <= durable_step:
            return None
        return [{n: [found.files[n]["size"], M.digest(found.files[n])[1]] for n in
                 info["written"][str(r)]} for r in range(self.world_size)]

    def written_by_me(self, path: str) -> list[str]:
        return read_tier_info(path)["written"][str(self.rank)]


def in_save_process(template: str, keep_last_n: int, rank: int, world_size: int) -> LocalTier:
    """The save process's LocalTier (async_save/child.py builds it there, after joining the
    save processes' group): the same dirs and node layout. Collective over that group."""
    tier = LocalTier(template, keep_last_n, rank, world_size)
    tier.setup()
    return tier


def _local_words(text: str) -> str:
    """The advice of an error (errors.no_space_line) in the local tier's flags."""
    return text.replace("--keep_last_n_checkpoints", "--keep_last_n_local_checkpoints").replace(
        "another --checkpoint_dir", "another --local_checkpoint_dir")


def _shared(md, fqn: str) -> bool:
    """An entry stored once for all ranks (one chunk covering the whole tensor), which every
    node needs; a rank's own `rank_*` entry is in its own file."""
    item = md.state_dict_metadata[fqn]
    return (not fqn.startswith("rank_") and isinstance(item, TensorStorageMetadata)
            and len(item.chunks) == 1 and list(item.chunks[0].sizes) == list(item.size))

