"""torchrun worker: save and load one FSDP2-sharded GPT + AdamW state in several ways, side by side.

    torchrun --nproc_per_node N -m bench.ckpt_worker --model gpt2-124m --root DIR --out R.json

Every repetition runs each way once, in a rotated order, on the same state and filesystem:

  writes  raw     each rank writes its bytes (as many as its DCP shard file) with one buffered
                  write + fsync (object store: one fsspec pipe_file per rank)
          dcp     bare dcp.save as torchtitan calls it: DCP's own FileSystemWriter with its
                  defaults (thread_count=1, sync_files=True: every file fsynced) for a local
                  dir; for URLs the fsspec writer our Storage hands out
          ours    dcp_train.checkpoint.Checkpointer.save: temp dir, dcp.save (every file's
                  checksum computed while writing, every file fsynced), manifest, rename,
                  `latest`, retention
          async   (if Checkpointer.save takes asynchronous=) the same save in the background:
                  `blocked` is the time save() held the caller (staging copy), `total` the
                  time until it was committed; one Checkpointer over all repetitions, so its
                  staging buffers are reused as in training (an untimed warm-up save first)
          gather  (--gather) the original guide's way: full state dict gathered to rank 0
                  (get_state_dict full_state_dict + cpu_offload), one torch.save + fsync
  reads   raw     each rank reads its raw file back with one readinto (local only)
          dcp     bare dcp.load into the model/optimizer state dict with DCP's own
                  FileSystemReader (local only)
          ours    the trainer's resume path: CheckpointDir.find_latest(defer=True) on rank 0
                  (manifest, sizes, checksum of .metadata), agreed on, restore.load
                  (dcp.load into the model and optimizer, each rank checksumming the files
                  it reads as DCP reads them)
          ours_noverify  the same with CheckpointDir(verify=False)

A time is wall clock from a barrier before the operation to a barrier after it (the slowest
rank). Each write also counts its CPU-seconds (user + system, every thread) summed over the
ranks' processes and, for `async`, their save processes (/proc/<pid>/stat). Before every timed operation rank 0 syncs and drops the page cache if it can, so reads
are cold-cache reads (the result says whether that worked). Rank 0 writes the result JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor

from bench.common import cpu_seconds, drop_page_cache, model_config
from dcp_train import distributed as D
from dcp_train.checkpoint import restore
from dcp_train.checkpoint import state as S
from dcp_train.checkpoint.async_save.save_process import SaveProcess
from dcp_train.checkpoint.io.lease import WriterLease
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.protocol import Checkpointer
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer


# Phase timers, reset before each timed operation. A second pass of verification (files no
# rank read while loading) is timed where it happens, in dcp_train.manifest.hash_files.
# The wrapper is put on the module attribute in this benchmark process only; no file of
# dcp_train is changed.
PHASES: dict[str, float] = {}


def _timing(name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t
    return wrapper


from dcp_train.checkpoint.io import manifest as _manifest
_manifest.hash_files = _timing("hash", _manifest.hash_files)



class TimedCheckpointer(Checkpointer):
    """Our Checkpointer, unchanged, with phases timed."""

    def commit(self, *args, **kwargs):
        return _timing("commit", super().commit)(*args, **kwargs)


class TimedDir(CheckpointDir):
    """Our CheckpointDir, unchanged, with the discovery check timed."""

    def check(self, *args, **kwargs):
        return _timing("check", super().check)(*args, **kwargs)


def make_checkpointer(root: str, so: dict, rank: int) -> TimedCheckpointer:
    directory = TimedDir(root, so)
    if rank == 0:  # as the trainer does before saving
        WriterLease(directory.storage).acquire()
    return TimedCheckpointer(directory, save_process=SaveProcess)


def components(model, opt, rank: int, progress=None) -> tuple[list, object]:
    """(shared components, this rank's entry) as the trainer lists them, without a loader."""
    progress = progress or S.Progress()
    return ([S.ModelState(model), S.OptimizerState(model, opt), progress],
            S.RankEntry(rank, rng=S.RNGState(0, rank, progress)))


def last_record(ckpt) -> dict:
    """The checkpoint record of the save that just finished (waits for an async one)."""
    ckpt.wait()
    recs = ckpt.records()
    return recs[-1] if recs else {}


def local_tensors(sd) -> list[torch.Tensor]:
    out = []
    for v in sd.values():
        if isinstance(v, dict):
            out += local_tensors(v)
        elif isinstance(v, DTensor):
            out.append(v.to_local())
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out


def build_state(model_name: str, info) -> tuple:
    """(model, optimizer, state dict) as the trainer saves them: a real FSDP2-sharded model
    and AdamW state from one real step."""
    mcfg = model_config(model_name)
    torch.manual_seed(0)
    model = D.shard_model(GPT(mcfg), info)
    opt = build_optimizer(model, 6e-4, 0.1, info.device_type)
    T = min(64, mcfg.block_size)
    x = torch.randint(0, mcfg.vocab_size, (1, T + 1), device=info.device)
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    shared, entry = components(model, opt, info.rank, S.Progress(
        step=1, tokens=T, world_size=info.world_size, samples_per_step=1,
        config={"bench_model": model_name}))
    sd = {}
    for component in [*shared, entry]:
        sd.update(component.state_dict())
    return model, opt, sd


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--root", required=True, help="local dir or fsspec URL to work in (emptied)")
    p.add_argument("--storage_options", default="{}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gather", action="store_true", help="also gather + torch.save on rank 0")
    p.add_argument("--no_load", action="store_true", help="writes only")
    args = p.parse_args()

    t_setup = time.perf_counter()
    info = D.setup(args.device)
    rank, ws, dev = info.rank, info.world_size, info.device
    so = json.loads(args.storage_options)
    st = Storage(args.root, so)
    local = st.is_local

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[ckpt ws={ws}] {msg}", flush=True)

    def sync_dev() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fresh() -> bool:
        """Untimed: flush everything and drop the page cache (rank 0), then meet."""
        dropped = False
        sync_dev()
        if rank == 0 and local:
            dropped = drop_page_cache()
        D.barrier()
        return dropped

    def timed(fn) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        sync_dev()
        dist.barrier()
        return time.perf_counter() - t

    def clean(keep=()) -> None:
        """Empty the work dir, except the dirs in `keep` (whose old step dirs are removed)."""
        D.barrier()
        if rank == 0:
            for name in st.listdir(st.root):
                path = st.join(name)
                if path in keep:
                    for sub in st.listdir(path):
                        if sub.startswith("step_"):
                            st.rm_tree(st.join(name, sub))
                elif local and not os.path.isdir(path):
                    os.remove(path)
                else:
                    st.rm_tree(path)
        D.barrier()

    model, opt, sd = build_state(args.model, info)
    n_params = model.num_params()
    log(f"model {args.model}: {n_params:,} params, setup {time.perf_counter() - t_setup:.1f}s")

    # ---- bytes per rank: the size of this rank's DCP file(s), from one untimed warm-up save
    clean()
    warm = st.join("warmup")
    dcp.save(sd, storage_writer=st.dcp_writer(warm))
    D.barrier()
    files = st.find(warm)
    my_bytes = sum(s for n, s in files.items() if n.startswith(f"__{rank}_"))
    per_rank = D.agree(lambda: my_bytes, every_rank=True)
    meta_bytes = files.get(".metadata", 0)
    clean()

    # the raw payload: this rank's tensor bytes in one contiguous buffer of my_bytes bytes
    buf = torch.zeros(my_bytes, dtype=torch.uint8, device=dev)
    pos = 0
    for t in local_tensors(sd):
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        n = min(b.numel(), my_bytes - pos)
        buf[pos:pos + n] = b[:n]
        pos += n
        if pos >= my_bytes:
            break
    rbuf = torch.empty(my_bytes, dtype=torch.uint8)  # host buffer for raw reads
    payload = None if local else buf.cpu().numpy().tobytes()

    raw_path = st.join("raw", f"rank_{rank:05d}.bin")
    ours_root = st.join("ours")

    def raw_write() -> None:
        if local:
            host = buf.cpu().numpy()
            os.makedirs(os.path.dirname(raw_path), exist_ok=True)
            with open(raw_path, "wb") as f:  # buffered
                f.write(memoryview(host))
                f.flush()
                os.fsync(f.fileno())
        else:
            st.fs.pipe_file(raw_path, payload)

    def raw_read() -> None:
        with open(raw_path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(rbuf.numpy()))
        assert got == my_bytes, (got, my_bytes)
        if dev.type == "cuda":
            rbuf.to(dev)

    result = {"world_size": ws, "model": args.model, "n_params": n_params,
              "device": str(dev.type), "root_is_local": local,
              "bytes": {"per_rank": per_rank, "metadata": meta_bytes,
                        "total": sum(per_rank) + meta_bytes},
              "write": {"raw": [], "dcp": [], "ours": []}, "read": {}, "cpu": {},
              "ours_record": [], "phases": {}, "cache_dropped": [], "gather_bytes": None,
              "has_async": local, "has_verify": True}
    if args.gather:
        result["write"]["gather"] = []
    if local:
        result["write"]["async_blocked"] = []
        result["write"]["async_total"] = []
    reads = ["raw", "dcp", "ours", "ours_noverify"]
    if local and not args.no_load:
        result["read"] = {name: [] for name in reads}

    def note_phases(name: str, extra: dict | None = None) -> None:
        """Each phase's maximum over ranks (the slowest rank holds everyone at the end)."""
        per_rank = D.agree(lambda: {**PHASES, **(extra or {})}, every_rank=True)
        for key in set().union(*per_rank):
            vals = [ph.get(key, 0.0) for ph in per_rank]
            result["phases"].setdefault(name, {}).setdefault(key, []).append(max(vals))

    # the async Checkpointer lives across repetitions (reused staging buffers, as in training)
    async_root = st.join("async")
    async_ckpt = None
    if local:
        async_ckpt = make_checkpointer(async_root, so, rank)
        async_ckpt.save(10_000, sd, rank, ws, asynchronous=True)  # untimed warm-up
        last_record(async_ckpt)
        D.barrier()

    for rep in range(args.reps):
        dcp_dir = st.join(f"dcp_bare_{rep}")
        ckpt = make_checkpointer(ours_root, so, rank)
        box = {}

        def dcp_save() -> None:
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(dcp_dir) if local
                     else st.dcp_writer(dcp_dir))

        def ours_save() -> None:
            ckpt.save(rep + 1, sd, rank, ws)
            box["record"] = last_record(ckpt)

        def async_save() -> None:
            t = time.perf_counter()
            async_ckpt.save(10_001 + rep, sd, rank, ws, asynchronous=True)
            async_ckpt.staged()  # what the next optimizer step would wait for
            box["blocked"] = time.perf_counter() - t
            box["async_record"] = last_record(async_ckpt)  # waits for the commit

        def gather_save() -> None:
            msd, osd = get_state_dict(model, opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            if rank == 0:
                path = st.join("gathered.pt")
                with open(path, "wb") as f:
                    torch.save({"model": msd, "optimizer": osd, "step": rep + 1}, f)
                    f.flush()
                    os.fsync(f.fileno())
                result["gather_bytes"] = os.path.getsize(path)

        writes = [("raw", raw_write), ("dcp", dcp_save), ("ours", ours_save)]
        if local:
            writes.append(("async", async_save))
        if args.gather:
            writes.append(("gather", gather_save))
        k = rep % len(writes)
        for name, fn in writes[k:] + writes[:k]:
            result["cache_dropped"].append(fresh())
            PHASES.clear()
            pids = [async_ckpt._saver._process.pid] if name == "async" else []
            c0 = cpu_seconds(pids)
            dt = timed(fn)
            cpu = cpu_seconds(pids) - c0
            result["cpu"].setdefault(name, []).append(sum(D.agree(lambda: cpu, every_rank=True)))
            if name == "async":
                blocked = max(D.agree(lambda: box["blocked"], every_rank=True))
                result["write"]["async_blocked"].append(blocked)
                result["write"]["async_total"].append(dt)
                note_phases("async_save", {"blocked": box["blocked"]})
                log(f"rep {rep} write {'async':13s} {dt:7.2f}s (blocked {blocked:.3f}s)")
                continue
            result["write"][name].append(dt)
            if name == "ours":
                note_phases("ours_save")
            log(f"rep {rep} write {name:13s} {dt:7.2f}s")
        result["ours_record"].append({k: v for k, v in box["record"].items() if k != "path"})

        if local and not args.no_load:
            tpl = {**S.ModelState(model).state_dict(), **S.OptimizerState(model, opt).state_dict()}

            def dcp_load() -> None:
                dcp.load(tpl, storage_reader=dcp.FileSystemReader(dcp_dir))

            def resume(verify) -> None:
                directory = TimedDir(ours_root, so, verify=verify)
                found = D.agree(lambda: directory.find_latest(defer=True))
                assert found is not None, "no checkpoint found"
                shared, entry = components(model, opt, rank)
                problem = restore.load(found, directory.storage, shared, entry, verify, rank, ws)
                assert problem is None, problem

            loads = {"raw": raw_read, "dcp": dcp_load, "ours": lambda: resume(True),
                     "ours_noverify": lambda: resume(False)}
            k = rep % len(reads)
            for name in reads[k:] + reads[:k]:
                result["cache_dropped"].append(fresh())
                PHASES.clear()
                dt = timed(loads[name])
                result["read"][name].append(dt)
                if name.startswith("ours"):
                    note_phases(f"{name}_load")
                log(f"rep {rep} read  {name:13s} {dt:7.2f}s")
        clean(keep=[async_root])

    if async_ckpt is not None:
        async_ckpt.close()

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    D.barrier()
    if rank == 0 and local:
        shutil.rmtree(st.root, ignore_errors=True)
    D.teardown()


if __name__ == "__main__":
    main()
