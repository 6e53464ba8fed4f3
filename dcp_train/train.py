"""The training loop: build-nanogpt's train_gpt2.py, with resumable state and DCP checkpoints.

Step s is the s-th optimizer update (DESIGN.md). After update s: log it, run the evaluations
that are due, save a checkpoint if due. Checkpoint s therefore holds the state after s updates
and a resumed run performs update s+1 next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import time

import torch
from torch.nn.utils import clip_grad_norm_

from dcp_train import deterministic
from dcp_train import distributed as D
from dcp_train import rng
from dcp_train import state as S
from dcp_train.checkpoint import CheckpointError, Checkpointer, Found, unusable
from dcp_train.config import Config, ConfigError, grad_accum_steps
from dcp_train.data import (DataError, TokenShards, build_train_loader, find_shards,
                            val_batches)
from dcp_train.data.remote import cache_dir, fetch_shards, is_remote
from dcp_train.data.prepare import ensure_default_data
from dcp_train.evaluate import val_loss
from dcp_train.generate import generate
from dcp_train.hellaswag import hellaswag_accuracy
from dcp_train.metrics import Metrics, resident_mb
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer, lr_at
from dcp_train.preempt import EXIT_PREEMPTED, Preemption
from dcp_train.tokenizer import get_tokenizer


def _due(interval: int, step: int, last: bool) -> bool:
    return interval > 0 and (step % interval == 0 or last)


def check_compatible(saved: dict, cfg: Config) -> None:
    """The saved model must have the dimensions the flags ask for."""
    saved_model = saved["config"]["model"]
    diff = [f"{k}: checkpoint {saved_model[k]} vs flags {v}"
            for k, v in vars(cfg.model).items() if k != "dropout" and saved_model.get(k) != v]
    if diff:
        raise ConfigError("checkpoint model does not match the flags (" + "; ".join(diff) +
                          "); pass the same --preset/dimension flags or another --checkpoint_dir")


def check_resumable(found: Found, cfg: Config, samples_per_step: int) -> None:
    check_compatible(found.meta, cfg)
    deterministic.check_resume(found.meta["config"], cfg)
    if found.meta["samples_per_step"] != samples_per_step:
        raise ConfigError(f"checkpoint used {found.meta['samples_per_step']} samples per "
                          f"step, the flags give {samples_per_step}; keep --total_batch_size "
                          "and --seq_len of the saved run")


def on_rank0(info: D.DistInfo, fn):
    """fn() on rank 0 only; every rank gets its result, or raises its exception."""
    answer = None
    if info.is_main:
        try:
            answer = fn()
        except Exception as e:
            answer = e
    answer = D.broadcast_object(answer)
    if isinstance(answer, Exception):
        raise answer
    return answer


def find_resume_point(cfg: Config, ckpt: Checkpointer, info: D.DistInfo) -> Found | None:
    """Rank 0 decides which checkpoint to resume from; every rank gets the same answer. The
    CRC-32s of its shard files are checked later, while loading (Checkpointer.load)."""
    def decide():
        ckpt.probe()  # an unreachable endpoint or a missing bucket fails here, not at a save
        ckpt.check_lease()  # another live run writes here: refuse before reading its dirs
        if cfg.resume:
            return ckpt.open_checkpoint(cfg.checkpoint_path, defer=True)
        if cfg.auto_resume:
            return ckpt.find_latest(defer=True)
        return None
    return on_rank0(info, decide)


def load_resume_point(cfg: Config, ckpt: Checkpointer, info: D.DistInfo, found: Found, model,
                      optimizer, samples_per_step: int) -> tuple[Found, dict | None]:
    """Load `found` into model and optimizer: (the checkpoint loaded, this rank's entry or
    None). If verification during the load finds it damaged, a discovered checkpoint falls
    back to the next one that discovery offers (its note says why); one named with
    --checkpoint_path is an error."""
    rejected = {}
    while True:
        same_world = found.meta["world_size"] == info.world_size
        entry, problem = ckpt.load(found, model, optimizer, info.rank, info.world_size,
                                   same_world)
        if problem is None:
            return found, entry
        if not found.discovered:
            raise CheckpointError(unusable(cfg.checkpoint_path, problem))
        rejected[posixpath.basename(found.path)] = problem
        found = on_rank0(info, lambda: ckpt.fall_back(found, rejected))
        check_resumable(found, cfg, samples_per_step)


def local_data_dir(cfg: Config, info: D.DistInfo) -> str:
    """--data_dir itself, or for a URL the local cache its shards are downloaded to (by local
    rank 0 of each node; every rank gets the first error, if any)."""
    if not is_remote(cfg.data_dir):
        return cfg.data_dir.removeprefix("file://")
    local, error = cache_dir(cfg.data_dir), None
    if info.local_rank == 0:
        try:
            local = fetch_shards(cfg.data_dir, cfg.storage_options_dict)
        except DataError as e:
            error = str(e)
    errors = [e for e in D.all_gather_objects(error) if e]
    if errors:
        raise DataError(errors[0])
    return local


def prepare_inputs(cfg: Config, info: D.DistInfo, metrics: Metrics):
    """(train shard files, val shard files, tokenizer or None, HellaSwag interval in effect)."""
    # the embedded default corpus is written on first use of the default --data_dir
    if cfg.data_dir == Config.data_dir and info.is_main:
        ensure_default_data(cfg.data_dir, cfg.tokenizer_file)
    D.barrier()
    data_dir = local_data_dir(cfg, info)
    train_files, val_files = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    # open every shard now (header and length only): a bad shard fails before the writer
    # lease is taken, so a failed start leaves nothing in --checkpoint_dir
    TokenShards(train_files, cfg.seq_len)
    if cfg.eval_interval > 0:
        TokenShards(val_files, cfg.seq_len)
    hellaswag_interval = cfg.hellaswag_interval
    if hellaswag_interval > 0 and not os.path.isfile(cfg.hellaswag_path):
        if cfg.hellaswag_path != Config.hellaswag_path:
            raise ConfigError(f"--hellaswag_path {cfg.hellaswag_path} does not exist; get it with "
                              "python -m dcp_train.hellaswag --download DIR")
        hellaswag_interval = 0  # the default file is optional: say so and go on without it
        metrics.say(f"HellaSwag off: {cfg.hellaswag_path} not found (python -m "
                    "dcp_train.hellaswag --download data/hellaswag fetches it)")
    enc = None
    if cfg.generate_interval > 0 or hellaswag_interval > 0:
        enc = get_tokenizer(cfg.tokenizer_file)
    return train_files, val_files, enc, hellaswag_interval


def open_checkpoints(cfg: Config, info: D.DistInfo, samples_per_step: int):
    """(Checkpointer, checkpoint to resume from or None). Everything that can be wrong with
    the flags or the checkpoint short of a damaged shard file is found here, before the
    model is built."""
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.storage_options_dict,
                        cfg.keep_last_n_checkpoints, verify=cfg.verify_checkpoint)
    found = find_resume_point(cfg, ckpt, info)
    if found is not None:
        check_resumable(found, cfg, samples_per_step)
    return ckpt, found


def train(cfg: Config, info: D.DistInfo) -> int:
    """Run to --max_steps (or --stop_at_step); returns the exit code: 0, or EXIT_PREEMPTED
    after a stop with a checkpoint on SIGTERM/SIGUSR1."""
    metrics = Metrics(cfg.log_dir, info.is_main, tensorboard=cfg.tensorboard)
    preempt = Preemption(cfg.preempt_timeout)
    if cfg.deterministic:  # a world size that does not divide the micro-batches: error here
        deterministic.setup(cfg, info.world_size, info.device_type)
    accum = grad_accum_steps(cfg, info.world_size)
    samples_per_step = cfg.total_batch_size // cfg.seq_len
    device, dtype_note = info.device, "bf16" if info.device_type == "cuda" else "fp32"
    train_files, val_files, enc, hellaswag_interval = prepare_inputs(cfg, info, metrics)
    ckpt, found = open_checkpoints(cfg, info, samples_per_step)

    # model: identical init on every rank, then sharded
    torch.manual_seed(cfg.seed)
    model = D.shard_model(GPT(cfg.model), info)
    optimizer = build_optimizer(model, cfg.max_lr, cfg.weight_decay, info.device_type)
    det_step = (deterministic.DeterministicStep(cfg, model, info.rank, info.world_size, device)
                if cfg.deterministic else None)
    progress = S.Progress()
    entry = None
    if found is not None:
        found, entry = load_resume_point(cfg, ckpt, info, found, model, optimizer,
                                         samples_per_step)
        meta = found.meta
        progress = S.Progress(meta["step"], meta["tokens"], meta["val_loss"])
    # nothing is written to --checkpoint_dir before here: then rank 0 takes its writer lease
    on_rank0(info, ckpt.acquire_lease)

    loader = build_train_loader(train_files, cfg.seq_len, cfg.batch_size, samples_per_step,
                                info.rank, info.world_size, cfg.seed, cfg.num_workers,
                                start_step=progress.step)
    if entry is not None:
        # the loader's own state is only valid for the same worker count (torchdata asserts);
        # otherwise start_step above already put it at the same global position
        if found.meta["config"]["num_workers"] == cfg.num_workers:
            loader.load_state_dict(entry["loader"])
        rng.restore(entry["rng_tensors"], entry["rng_plain"])
        rng_policy = "restored"
    else:
        rng.seed_all(cfg.seed, progress.step, info.rank)
        rng_policy = "seeded(seed, step, rank)"
    if found is not None:
        if found.note:
            metrics.say(f"WARNING: {found.note}")
        metrics.log("resume", step=progress.step, path=found.path,
                    world_size_saved=found.meta["world_size"], world_size=info.world_size,
                    rng=rng_policy, note=found.note)
        metrics.say(f"resumed from {found.path} at step {progress.step} "
                    f"(world size {found.meta['world_size']} -> {info.world_size}, rng {rng_policy})")
    elif cfg.auto_resume:
        metrics.say(f"no checkpoint in {ckpt.root}: starting fresh at step 0")
    metrics.say(f"model {sum(p.numel() for p in model.parameters()):,} params, {dtype_note}, "
                f"world {info.world_size}, grad accum {accum}, device {device}")

    config_dict = dataclasses.asdict(cfg)

    def log_checkpoints() -> None:
        for record in ckpt.records():
            metrics.log("checkpoint", **record, rss_mb=resident_mb())
            metrics.say(f"step {record['step']:6d} | checkpoint {record['path']} committed "
                        f"({record['seconds']:.2f}s, loop blocked {record['blocked_s']:.2f}s, "
                        f"{record['bytes'] or 0:,} bytes)")

    def save() -> int:
        sd = S.build(model, optimizer, progress, loader, info.rank, info.world_size,
                     samples_per_step, config_dict)
        ckpt.save(progress.step, sd, info.rank, asynchronous=cfg.async_checkpoint)
        log_checkpoints()
        return progress.step

    # the step whose state is already committed in --checkpoint_dir
    saved_step = found.step if found and found.path == ckpt.step_path(found.step) else None
    batches = iter(loader)
    t_start = time.perf_counter()
    final_step = cfg.max_steps if cfg.stop_at_step < 0 else min(cfg.stop_at_step, cfg.max_steps)
    stopping = False
    for step in range(progress.step + 1, final_step + 1):
        last = step == final_step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        sample_ids = []
        if det_step is not None:  # --deterministic: exact sums on a replica (deterministic.py)
            loss_mean, norm = det_step(optimizer, batches, step, sample_ids)
        else:
            for micro in range(accum):
                ids, x, y = next(batches)
                sample_ids += ids.tolist()
                model.set_requires_gradient_sync(micro == accum - 1)
                _, loss = model(x.to(device), y.to(device))
                loss = loss / accum
                loss_sum += loss.detach()
                loss.backward()
            norm = clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_mean = D.mean_over_ranks(loss_sum).item()
            norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
        # one small gather per step: the step's sample ids, and whether a rank got a signal
        gathered = D.all_gather_objects((sample_ids, preempt.requested))
        all_ids = sorted(i for ids, _ in gathered for i in ids)
        stopping = any(flag for _, flag in gathered)
        if info.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        progress.step, progress.tokens = step, progress.tokens + cfg.total_batch_size
        metrics.log("train", step=step, loss=loss_mean, lr=lr, grad_norm=norm,
                    tokens=progress.tokens, tokens_per_s=cfg.total_batch_size / dt,
                    batch_digest=hashlib.sha256(repr(all_ids).encode()).hexdigest()[:16])
        metrics.say(f"step {step:6d} | loss {loss_mean:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                    f"tok/s {cfg.total_batch_size / dt:9.0f} | "
                    f"elapsed {time.perf_counter() - t_start:7.1f}s")

        if _due(cfg.eval_interval, step, last):
            progress.val_loss = val_loss(model, val_batches(
                val_files, cfg.seq_len, cfg.batch_size, info.rank, info.world_size,
                cfg.val_steps), device)
            metrics.log("val", step=step, loss=progress.val_loss)
            metrics.say(f"step {step:6d} | val loss {progress.val_loss:.4f}")
        if _due(hellaswag_interval, step, last):
            correct, total, acc = hellaswag_accuracy(model, cfg.hellaswag_path, enc, device,
                                                     info.rank, info.world_size,
                                                     limit=cfg.hellaswag_limit)
            metrics.log("hellaswag", step=step, correct=correct, total=total, acc_norm=acc)
            metrics.say(f"step {step:6d} | HellaSwag acc_norm {correct}/{total} = {acc:.4f}")
        if _due(cfg.generate_interval, step, last):
            for i, text in enumerate(generate(model, enc, cfg.prompt, rank=info.rank,
                                              device=device)):
                metrics.say(f"sample {i}: {text!r}")
        ckpt.poll()  # an async save that every rank has finished is logged now
        log_checkpoints()
        if info.is_main:
            ckpt.lease.refresh()
        if _due(cfg.checkpoint_interval, step, last) or last or stopping:
            saved_step = save()
        if stopping:
            metrics.say(f"preempted: stopped after step {step} with a checkpoint; exit code "
                        f"{EXIT_PREEMPTED} (continue with --auto_resume)")
            break
    if saved_step != progress.step:  # resumed at the final step from another dir/world size
        save()
    ckpt.close()  # waits for a save still in flight: the last step is always committed
    log_checkpoints()
    if info.is_main:
        ckpt.lease.release()
    metrics.close()
    return EXIT_PREEMPTED if stopping else 0
