"""The training loop: build-nanogpt's train_gpt2.py, with resumable state and DCP checkpoints.

Step s is the s-th optimizer update (docs/design.md, "Step"). After update s: log it, run the
evaluations that are due, save a checkpoint if due. Checkpoint s therefore holds the state
after s updates and a resumed run performs update s+1 next.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import torch
from torch.nn.utils import clip_grad_norm_

from dcp_train import compiled
from dcp_train import distributed as D
from dcp_train.checkpoint.manager import CheckpointManager
from dcp_train.checkpoint.state import (LoaderState, ModelState, OptimizerState, Progress, RNGState,
                                        RankEntry)
from dcp_train.config import Config, DataConfig, EvalConfig, redacted_config
from dcp_train.data import TokenShards, build_train_loader, find_shards, val_batches
from dcp_train.data.fingerprint import data_fingerprint
from dcp_train.data.prepare import ensure_default_data
from dcp_train.data.remote import cache_dir, fetch_shards, is_remote
from dcp_train.data.tokenizer import get_tokenizer
from dcp_train.errors import EXIT_PREEMPTED, ConfigError
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer, lr_of, saved_schedule, schedule_for_launch
from dcp_train.job import failure
from dcp_train.job.faults import fault_point
from dcp_train.job.metrics import Metrics, launch_record
from dcp_train.job.preempt import Preemption
from dcp_train.job.schedule import due
from dcp_train.train import deterministic
from dcp_train.train.evaluate import val_loss
from dcp_train.train.flops import Throughput, model_flops_per_token, peak_flops
from dcp_train.train.generate import generate
from dcp_train.train.hellaswag import hellaswag_accuracy
from dcp_train.train.hf_import import load_hf_weights, local_init_dir


def train(cfg: Config, info: D.DistInfo, setup_s: float | None = None) -> int:
    """Run to --max_steps (or --stop_at_step); returns the exit code: 0, or EXIT_PREEMPTED
    after a stop with a checkpoint on SIGTERM/SIGUSR1 (`setup_s`: for the `config` record)."""
    t, workers, log = cfg.training, cfg.data.num_workers, cfg.logging
    metrics = Metrics(log.log_dir, info.is_main, tensorboard=log.tensorboard,
                      wandb_project=log.wandb_project if log.wandb else None, hold=True)
    metrics.log("config", **launch_record(cfg, info.world_size, str(info.device), setup_s))
    preempt = Preemption(cfg.checkpoint.preempt_timeout, speaker=info.is_main)
    if t.deterministic:  # a world size that does not divide the micro-batches: error here
        deterministic.setup(cfg, info.world_size, info.device_type)
    accum = grad_accum_steps(cfg, info.world_size)
    samples_per_step = t.total_batch_size // t.seq_len
    train_files, val_files, enc, hellaswag_interval = prepare_inputs(cfg, info, metrics)

    # model: identical init on every rank, then sharded
    torch.manual_seed(t.seed)
    compile_blocks = compiled.resolve(cfg.hardware.compile, info.device_type)
    model = D.shard_model(GPT(cfg.model), info, compile=compile_blocks)
    optimizer = build_optimizer(model, t.max_lr, t.weight_decay, info.device_type)
    one_step = step_function(cfg, model, info, accum)
    progress = Progress(world_size=info.world_size, samples_per_step=samples_per_step,
                        config=redacted_config(cfg),
                        data_fingerprint=D.agree(lambda: data_fingerprint(train_files)))
    loader = LoaderState(lambda step: build_train_loader(
        train_files, t.seq_len, t.batch_size, samples_per_step, info.rank,
        info.world_size, t.seed, workers, start_step=step), workers, progress)
    ckpt = CheckpointManager(cfg, info, metrics, progress,
                             shared=[ModelState(model), OptimizerState(model, optimizer),
                                     progress],
                             entry=RankEntry(info.rank, rng=RNGState(t.seed, info.rank,
                                                                     progress), loader=loader))
    ckpt.resume(at_fresh_start=lambda: init_from_hf(cfg, info, model, progress, metrics))
    after_resume(cfg, info, model, progress, metrics)
    progress.lr_schedule = schedule_for_launch(
        saved_schedule(progress.saved) if progress.saved else None, t.max_lr,
        t.warmup_steps, t.max_steps, t.lr_schedule)
    metrics.say(f"model {model.num_params():,} params, "
                f"{'bf16' if info.device_type == 'cuda' else 'fp32'}, world {info.world_size}, "
                f"grad accum {accum}, device {info.device}")
    speed = Throughput(t.total_batch_size, info.world_size,
                       model_flops_per_token(model, t.seq_len),
                       peak_flops(info.device_type, cfg.hardware.peak_tflops,
                                  D.device_name(info)))
    metrics.say(f"compile {'on' if compile_blocks else 'off'}; MFU: {speed.describe()}")

    batches = iter(loader.loader)
    t_start = time.perf_counter()
    final_step = t.max_steps if t.stop_at_step < 0 else min(t.stop_at_step, t.max_steps)
    stopping = False
    for step in range(progress.step + 1, final_step + 1):
        last = step == final_step
        t0 = time.perf_counter()
        begin_step(info, step)
        lr = lr_of(step, progress.lr_schedule)
        loss, norm, sample_ids = one_step(optimizer, batches, step, lr)
        # one small gather per step: the step's sample ids, whether a rank got a signal, and
        # what the checkpoint manager agrees on (wall-time intervals, replication)
        reports = D.agree(lambda: ckpt.report(sample_ids, preempt.signum or 0),
                          every_rank=True)
        all_ids = sorted(i for r in reports for i in r.sample_ids)
        stopping = preempt.agreed([r.stop_requested for r in reports])
        if info.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        progress.step, progress.tokens = step, progress.tokens + t.total_batch_size
        rates = speed.rates(dt)
        metrics.log("train", step=step, loss=loss, lr=lr, grad_norm=norm,
                    tokens=progress.tokens, **rates, elapsed_s=time.perf_counter() - t_start,
                    batch_digest=hashlib.sha256(repr(all_ids).encode()).hexdigest()[:16])
        metrics.say(f"step {step:6d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                    f"tok/s {t.total_batch_size / dt:9.0f} | {speed.text(rates)} | "
                    f"elapsed {time.perf_counter() - t_start:7.1f}s")
        evaluate(cfg, info, metrics, model, enc, val_files, hellaswag_interval, progress, last)
        ckpt.step(step, last=last, stopping=stopping, reports=reports)
        if not (stopping or last) and ckpt.local is None and ckpt.committed_step == step:
            stopping = signal_during_save(preempt)  # stop at the save it interrupted
        if stopping:
            break
    return finish(ckpt, metrics, progress.step, stopping, t.max_steps)


def finish(ckpt: CheckpointManager, metrics: Metrics, step: int, stopping: bool,
           max_steps: int) -> int:
    """The end of the loop after step `step`: the last save committed (close waits for one
    in flight), then what ended the run, said after its `committed` line; the exit code."""
    ckpt.close()
    if stopping:
        metrics.say(f"preempted: stopped after step {step} with a checkpoint; exit code "
                    f"{EXIT_PREEMPTED} (continue with --auto_resume)")
    elif step < max_steps:  # exit 0: --stop_at_step asked for it
        metrics.say(f"stopped at step {step} (--stop_at_step), before --max_steps "
                    f"{max_steps}, with a checkpoint; continue with --auto_resume")
    metrics.close()
    return EXIT_PREEMPTED if stopping else 0


def signal_during_save(preempt: Preemption) -> bool:
    """Every rank, after a save at a step the ranks had not agreed to stop at: whether any
    rank got a signal meanwhile (then the run ends at that save, not one step later). With
    a local tier the stop's save is the durable one, so the loop stops at the next step."""
    return preempt.agreed(D.agree(lambda: preempt.signum or 0, every_rank=True))


def begin_step(info: D.DistInfo, step: int) -> None:
    """What this rank is doing, named if a peer dies or stalls (job/failure.py, stall.py);
    the `mid_step` fault point (tests only, job/faults.py)."""
    failure.set_activity(f"step {step}")
    fault_point("mid_step", info.rank, step)


def step_function(cfg: Config, model, info: D.DistInfo, accum: int):
    """The optimizer update: (optimizer, batches, step, lr) -> (loss, grad norm, this rank's
    sample ids). FSDP2's, or with --deterministic the exact one on a replica."""
    if cfg.training.deterministic:
        return deterministic.DeterministicStep(cfg, model, info.rank, info.world_size,
                                               info.device)
    return lambda optimizer, batches, step, lr: train_step(
        model, optimizer, batches, lr, accum, cfg.training.grad_clip, info.device)


def train_step(model, optimizer, batches, lr: float, accum: int, grad_clip: float, device):
    """One optimizer update over `accum` micro-batches: (mean loss over all ranks, global
    gradient norm before clipping, this rank's sample ids)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    sample_ids = []
    for micro in range(accum):
        ids, x, y = next(batches)
        sample_ids += ids.tolist()
        model.set_requires_gradient_sync(micro == accum - 1)
        _, loss = model(x.to(device), y.to(device))
        loss = loss / accum
        loss_sum += loss.detach()
        loss.backward()
    norm = clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    loss_mean = D.mean_over_ranks(loss_sum).item()
    norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
    return loss_mean, norm, sample_ids


def evaluate(cfg, info, metrics, model, enc, val_files, hellaswag_interval, progress,
             last: bool) -> None:
    """The evaluations due after step progress.step: val loss, HellaSwag, samples."""
    step, device = progress.step, info.device
    if due(cfg.eval.eval_interval, step, last):
        progress.val_loss = val_loss(model, val_batches(
            val_files, cfg.training.seq_len, cfg.training.batch_size, info.rank, info.world_size,
            cfg.eval.val_steps), device)
        metrics.log("val", step=step, loss=progress.val_loss)
        metrics.say(f"step {step:6d} | val loss {progress.val_loss:.4f}")
    if due(hellaswag_interval, step, last):
        correct, total, acc = hellaswag_accuracy(model, cfg.eval.hellaswag_path, enc, device,
                                                 info.rank, info.world_size,
                                                 limit=cfg.eval.hellaswag_limit)
        metrics.log("hellaswag", step=step, correct=correct, total=total, acc_norm=acc)
        metrics.say(f"step {step:6d} | HellaSwag acc_norm {correct}/{total} = {acc:.4f}")
    if due(cfg.eval.generate_interval, step, last):
        for i, text in enumerate(generate(model, enc, cfg.eval.prompt, rank=info.rank,
                                          device=device)):
            metrics.say(f"sample {i}: {text!r}")


def after_resume(cfg: Config, info: D.DistInfo, model, progress: Progress,
                 metrics: Metrics) -> None:
    """Once the resume decision is made (and at step 0 --init_from's weights loaded, before
    the writer lease: ckpt.resume's at_fresh_start): the run's id (the checkpoint's; a new
    one at step 0) opens the metrics files and the --wandb run (Metrics hold=True)."""
    if cfg.checkpoint.init_from and progress.saved is not None:
        metrics.say(f"--init_from {cfg.checkpoint.init_from} ignored: resumed from the "
                    f"checkpoint at step {progress.step}, which holds the weights")
    if progress.wandb_id is None:  # step 0, or a checkpoint older than the field
        progress.wandb_id = D.agree(lambda: uuid.uuid4().hex[:12])
    metrics.start_run(progress.wandb_id)


def init_from_hf(cfg: Config, info: D.DistInfo, model, progress: Progress,
                 metrics: Metrics) -> None:
    """--init_from (if given): the HF GPT-2 weights onto the sharded model, each rank its own
    shards; at a fresh start only (a resumed run keeps the checkpoint's weights)."""
    if not cfg.checkpoint.init_from or progress.saved is not None:
        return
    fetch = lambda: local_init_dir(cfg.checkpoint.init_from, cfg.storage_options_dict)  # noqa: E731
    directory = D.agree(fetch if info.local_rank == 0 else lambda: None, every_rank=True)
    directory = directory[info.rank - info.local_rank]  # this node's copy
    D.agree(lambda: load_hf_weights(model, directory), every_rank=True)
    metrics.say(f"weights from --init_from {cfg.checkpoint.init_from}")


def local_data_dir(cfg: Config, info: D.DistInfo) -> str:
    """--data_dir itself, or for a URL the local cache its shards are downloaded to (by local
    rank 0 of each node; every rank raises the first error, if any)."""
    if not is_remote(cfg.data.data_dir):
        return cfg.data.data_dir.removeprefix("file://")
    fetch = lambda: fetch_shards(cfg.data.data_dir, cfg.storage_options_dict)  # noqa: E731
    D.agree(fetch if info.local_rank == 0 else lambda: None, every_rank=True)
    return cache_dir(cfg.data.data_dir)


def prepare_inputs(cfg: Config, info: D.DistInfo, metrics: Metrics):
    """(train shard files, val shard files, tokenizer or None, HellaSwag interval in effect)."""
    # the embedded default corpus is written on first use of the default --data_dir
    if cfg.data.data_dir == DataConfig.data_dir and info.is_main:
        ensure_default_data(cfg.data.data_dir, cfg.eval.tokenizer_file)
    D.barrier()
    data_dir = local_data_dir(cfg, info)
    train_files, val_files = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    # open every shard now (header and length only): a bad shard fails before the writer
    # lease is taken, so a failed start leaves nothing in --checkpoint_dir
    TokenShards(train_files, cfg.training.seq_len)
    if cfg.eval.eval_interval > 0:
        TokenShards(val_files, cfg.training.seq_len)
    hellaswag_interval = cfg.eval.hellaswag_interval
    if hellaswag_interval > 0 and not os.path.isfile(cfg.eval.hellaswag_path):
        if cfg.eval.hellaswag_path != EvalConfig.hellaswag_path:
            raise ConfigError(f"--hellaswag_path {cfg.eval.hellaswag_path} does not exist; get "
                              "it with python -m dcp_train.hellaswag --download DIR")
        hellaswag_interval = 0  # the default file is optional: say so and go on without it
        metrics.say(f"HellaSwag off: {cfg.eval.hellaswag_path} not found (python -m "
                    "dcp_train.hellaswag --download data/hellaswag fetches it)")
    enc = None
    if cfg.eval.generate_interval > 0 or hellaswag_interval > 0:
        enc = get_tokenizer(cfg.eval.tokenizer_file)
    return train_files, val_files, enc, hellaswag_interval


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step so that total_batch_size tokens make one step."""
    t = cfg.training
    per_micro = t.batch_size * t.seq_len * world_size
    if t.total_batch_size % per_micro:
        raise ConfigError(
            f"--total_batch_size {t.total_batch_size} is not divisible by batch_size*seq_len*"
            f"world_size = {t.batch_size}*{t.seq_len}*{world_size} = {per_micro}; "
            "change --batch_size or --total_batch_size")
    return t.total_batch_size // per_micro

