"""BYOL pretraining.

    python -m trainer.pretrain --preset cpu-quick --data IMAGES --out runs/quick
    torchrun --nproc_per_node 8 -m trainer.pretrain --preset imagenet-resnet50 --data /imagenet/train --out runs/in1k

The run directory receives config.json, metrics.jsonl, TensorBoard events, checkpoint.pt
(atomic, every --set run.checkpoint_every_s seconds and/or run.checkpoint_every steps) and
encoder.safetensors (the encoder with its preprocessing contract). `--resume` continues a killed run from its last
checkpoint; `--extend` trains a finished run on for a further --time-budget or --max-steps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .augment import BatchAugment, byol_views
from .config import PRESETS, Config, apply_override, preset
from .data import (
    BatchPlan,
    ImageCollection,
    decode_all,
    fill_batch,
    open_collection,
    prefetch_to_device,
    sample_collection,
    sample_indices,
    stream_loader,
)
from .distributed import Dist, all_reduce, all_reduce_mean, barrier, init_distributed, shutdown
from .knn import embed, knn_accuracy
from .models import BYOL, build_encoder
from .optim import build_optimizer, parameter_groups, tau_schedule, warmup_cosine
from .runtime import DataError, Stop, UsageError, cli_main, log, open_run, progress_bar, resolve_device, seed_process
from .settings import write_config

MEMORY_PIPELINE_MAX_BYTES = 4 << 30  # decode into RAM when the uint8 images fit in 4 GiB


# ============================================================================================
# Command line
# ============================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain an image encoder with BYOL (Grill et al. 2020) on unlabelled images.",
        epilog="Presets:\n" + "\n".join(f"  {name:20s} {(fn.__doc__ or '').strip().splitlines()[0]}"
                                       for name, fn in PRESETS.items())
        + "\n\nAny preset value can be overridden: --set optim.base_lr=0.5 --set model.arch=resnet50"
          "\n(see config.json of a run for every setting).")
    p.add_argument("--preset", default=None, help=f"named configuration: {', '.join(PRESETS)} "
                   "(default: cpu-quick, or the resumed run's own)")
    p.add_argument("--data", help="(required unless resuming) image folder (class sub-folders optional), "
                   "zip archive of one, or a torchvision data set: cifar10, cifar100, stl10 (downloaded when online)")
    p.add_argument("--out", required=True, help="run directory (created; must be new unless --resume)")
    p.add_argument("--val-data", default=None, help="labelled images for the kNN monitor "
                   "(e.g. a test split); needs labelled --data too")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--extend", action="store_true", help="train the run in --out on for a further --time-budget or "
                   "--max-steps: weights, optimiser state and step count carry on; the LR and tau schedules start "
                   "again over the added steps (a warm restart)")
    p.add_argument("--epochs", type=int, help="training epochs (optim.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (optim.max_steps); "
                   "the schedules are laid out over it")
    p.add_argument("--time-budget", type=parse_duration, metavar="DURATION",
                   help="train for at most this long (e.g. 600, 10m, 2h): the step count and the schedules "
                        "are fitted to it after measuring the first steps (optim.time_budget_s)")
    p.add_argument("--batch-size", type=int, help="global batch size over all processes (optim.batch_size)")
    p.add_argument("--lr", type=float, help="base learning rate, scaled by batch/256 (optim.base_lr)")
    p.add_argument("--arch", help="encoder architecture (model.arch), e.g. resnet18, resnet50")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run.device")
    p.add_argument("--workers", type=int, help="data-loading worker processes per process (data.workers)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of a few steps to DIR")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set byol.tau_base=0.99 (repeatable)")
    p.add_argument("--stop-after-steps", type=int, metavar="N", help="stop after N steps of this invocation, "
                   "with a checkpoint (continue with --resume): for tests and short machine windows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 600, 10m, 1.5h)") from None


FLAG_TO_SETTING = {"time_budget": "optim.time_budget_s", "epochs": "optim.epochs", "max_steps": "optim.max_steps",
                   "batch_size": "optim.batch_size",
                   "lr": "optim.base_lr", "arch": "model.arch", "device": "run.device",
                   "workers": "data.workers", "seed": "run.seed", "compile": "run.compile"}


def resolve_config(name: str | None, overrides=(), settings: dict | None = None, saved: dict | None = None) -> Config:
    """Preset `name` (or, without one, the resumed run's config), then the --set overrides, then the
    plain flags (`settings`, FLAG_TO_SETTING's names; None: not given)."""
    if name is None and saved is not None:
        cfg = Config.from_dict(saved)
    else:
        cfg = preset(name or "cpu-quick")
    for assignment in overrides:
        apply_override(cfg, assignment)
    for flag, value in (settings or {}).items():
        if value is not None:
            apply_override(cfg, f"{FLAG_TO_SETTING[flag]}={json.dumps(value)}")
    return cfg


def validate(cfg: Config, dist: Dist) -> None:
    from .models import ARCHITECTURES, STEMS
    if cfg.model.arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {cfg.model.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if cfg.model.stem not in STEMS:
        raise UsageError(f"unknown stem {cfg.model.stem!r}; choose one of {', '.join(STEMS)}")
    o = cfg.optim
    if o.batch_size % (dist.world * o.accumulate):
        raise UsageError(f"batch size {o.batch_size} must divide evenly over {dist.world} process(es) "
                         f"x {o.accumulate} accumulation step(s)")
    if o.batch_size // (dist.world * o.accumulate) < 2:
        raise UsageError("each micro-batch needs at least 2 images for BatchNorm")
    if cfg.data.pipeline not in ("auto", "memory", "stream"):
        raise UsageError("data.pipeline must be auto, memory or stream")
    if cfg.run.precision not in ("auto", "bf16", "fp32"):
        raise UsageError("run.precision must be auto, bf16 or fp32")
    if cfg.run.checkpoint_every < 0 or cfg.run.checkpoint_every_s < 0:
        raise UsageError("run.checkpoint_every and run.checkpoint_every_s must be >= 0 (0: off)")


# ============================================================================================
# The parts of a run: model, augmentation, optimiser, schedules; the step
# ============================================================================================
@dataclasses.dataclass
class Pretraining:
    """What `build_pretraining` returns: everything one process needs to take BYOL steps."""
    cfg: Config
    byol: BYOL                      # online and target networks: what checkpoints hold
    model: torch.nn.Module          # `byol`, or its DistributedDataParallel wrapper
    forward: Callable               # `model`, or torch.compile(model)
    views: tuple                    # the two view augmentations (the stream loader applies them too)
    augment: BatchAugment
    optimizer: torch.optim.Optimizer
    feature_dim: int
    device: torch.device
    lr_peak: float                  # base_lr x batch / 256
    precision: str                  # bf16 | fp32

    def amp(self):
        """The forward pass's autocast context (bf16), or none (fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def schedules(self, total: int, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-step LR and tau over the whole run, indexed by the global step; an extended run's
        schedules start again at optim.schedule_start."""
        o = self.cfg.optim
        first, warmup_steps = o.schedule_start, round(o.warmup_epochs * steps_per_epoch)
        lr = warmup_cosine(self.lr_peak, total - first, warmup_steps)
        tau = tau_schedule(self.cfg.byol.tau_base, total - first)
        return np.concatenate([np.zeros(first), lr]), np.concatenate([np.ones(first), tau])


def build_pretraining(cfg: Config, device: torch.device, crop: bool = True, distributed: bool = False) -> Pretraining:
    """The networks, the batched augmentation, the optimiser and the schedules of `cfg` on `device`.

    `crop`: the augmentation crops uint8 images itself (memory pipeline); without it the batches come
    cropped by the loader (stream pipeline). `distributed`: DDP (and SyncBatchNorm on CUDA).
    """
    pre = cfg.data.train_preprocessing()
    views = byol_views(blur=cfg.data.blur, crop_scale=(cfg.data.crop_scale_min, 1.0),
                       color_strength=cfg.data.color_strength, grayscale_p=cfg.data.grayscale_p)
    augment = BatchAugment(views, cfg.data.image_size, pre.mean, pre.std, crop=crop).to(device)
    encoder, feature_dim = build_encoder(cfg.model.arch, cfg.model.stem)
    byol = BYOL(encoder, feature_dim, cfg.model.projector_hidden_dim, cfg.model.projection_dim,
                cfg.model.predictor_hidden_dim)
    if distributed and device.type == "cuda":
        byol = torch.nn.SyncBatchNorm.convert_sync_batchnorm(byol)
    byol = byol.to(device)
    if cfg.run.channels_last:
        byol = byol.to(memory_format=torch.channels_last)
    model = byol
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            byol, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    groups = (parameter_groups([byol.encoder, byol.projector], o.weight_decay)
              + parameter_groups([byol.predictor], o.weight_decay, o.predictor_lr_scale))
    lr_peak = o.base_lr * o.batch_size / 256
    optimizer = build_optimizer(o.name, groups, lr_peak, o.momentum, o.weight_decay, o.trust_coefficient)
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return Pretraining(cfg, byol, model, torch.compile(model) if cfg.run.compile else model, views, augment,
                       optimizer, feature_dim, device, lr_peak, precision)


def _no_phase(name: str):
    return contextlib.nullcontext()


def train_step(p: Pretraining, raw: torch.Tensor, lr: float, tau: float, weight: float = 1.0,
               phase: Callable = _no_phase) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch of uint8 images; the target then moves towards the online network.

    The batch is split into optim.accumulate micro-batches (under DDP the gradients are all-reduced
    on the last only); `weight` scales the loss (0: a blank batch that only keeps DDP in step).
    `phase(name)` is a context around each part (augment, forward, backward, optimizer, ema): the
    speed benchmark times them. Returns the last micro-batch's loss and projections (on the device).
    """
    for g in p.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    micro = p.cfg.optim.accumulate
    for k, chunk in enumerate(raw.chunk(micro)):
        with phase("augment"):
            view1, view2 = p.augment(chunk)
        last = p.model is p.byol or k == micro - 1
        with contextlib.nullcontext() if last else p.model.no_sync():
            with phase("forward"), p.amp():
                loss, projection = p.forward(view1, view2)
            with phase("backward"):
                (loss * (weight / micro)).backward()
    with phase("optimizer"):
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
    with phase("ema"):
        p.byol.update_target(tau)
    return loss, projection


class Feed:
    """The training images of one process: decoded into device memory once (memory pipeline), or
    decoded, cropped and augmented per image by loader workers (stream pipeline)."""

    def __init__(self, cfg: Config, data: str, dist: Dist, progress: bool):
        self.collection = collection = open_collection(data)
        self.plan = BatchPlan(len(collection), cfg.optim.batch_size, cfg.run.seed, dist.rank, dist.world)
        if self.plan.steps_per_epoch == 0:
            raise DataError("no full batch fits in the data set; lower --batch-size")
        self.cfg, self.dist, self.pre = cfg, dist, cfg.data.train_preprocessing()
        self.pipeline = cfg.data.pipeline
        if self.pipeline == "auto":
            fits = len(collection) * 3 * self.pre.resize_size ** 2 <= MEMORY_PIPELINE_MAX_BYTES
            self.pipeline = "memory" if fits and cfg.data.image_size <= 96 else "stream"
        self.images = self.labels = self.batches = None
        self.skipped = self.empty_steps = 0  # unreadable images; steps with none readable (no update)
        if self.pipeline == "memory":
            t0 = time.perf_counter()
            images, self.labels, skipped = decode_all(collection, self.pre, workers=cfg.data.workers,
                                                      progress=progress and dist.is_main,
                                                      desc="decoding images into memory")
            if skipped:
                log(dist, f"skipped {skipped} unreadable image(s) of {len(collection)}")
            self.images = images.to(dist.device)
            self.plan = BatchPlan(len(images), cfg.optim.batch_size, cfg.run.seed, dist.rank, dist.world,
                                  dist.device)
            log(dist, f"decoded {len(images)} images ({collection.description}) in {time.perf_counter() - t0:.1f}s")

    def start(self, views, start_step: int, total_steps: int) -> None:
        if self.pipeline == "stream":
            cfg, device = self.cfg, self.dist.device
            loader = stream_loader(self.collection, self.plan, cfg.data.image_size, views, cfg.run.seed, start_step,
                                   total_steps, cfg.data.workers, pin_memory=device.type == "cuda")
            self.batches = prefetch_to_device(loader, device)

    def batch(self, step: int) -> tuple[torch.Tensor | None, float]:
        """The step's uint8 batch and its loss weight; None: nothing to train on this step."""
        if self.pipeline == "memory":
            return self.images[self.plan.indices(step)], 1.0
        # unreadable images are left out by the loader; the batch is refilled to its full size from
        # the readable ones (fixed shapes; never a BatchNorm batch of one). With none readable the
        # step still counts but changes nothing: skipped alone, or (DDP, whose gradient all-reduce
        # needs every process) run on a blank batch with a zero loss weight
        raw, skipped = next(self.batches)
        self.skipped += skipped
        raw = fill_batch(raw, self.plan.local_batch)
        if raw is not None:
            return raw, 1.0
        self.empty_steps += 1
        if not self.dist.enabled:
            return None, 1.0
        size = self.cfg.data.image_size
        return torch.zeros((self.plan.local_batch, 2, 3, size, size), dtype=torch.uint8, device=self.dist.device), 0.0


# ============================================================================================
# Training
# ============================================================================================
def start_process(cfg: Config) -> Dist:
    """This process's device (and torchrun's process group), checked settings, seed, fast CUDA kernels."""
    dist = init_distributed(resolve_device(cfg.run.device))
    validate(cfg, dist)
    seed_process(cfg.run.seed, dist.rank)  # each process augments differently
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dist


def train(cfg: Config, data: str, out: Path, resume_state: dict | None = None, val_data: str | None = None,
          progress: bool = True, profile_dir: str | None = None, stop_after_steps: int | None = None) -> dict:
    """Train BYOL; `resume_state` is a loaded checkpoint to continue from."""
    dist = start_process(cfg)
    feed = Feed(cfg, data, dist, progress)
    p = build_pretraining(cfg, dist.device, crop=feed.pipeline == "memory", distributed=dist.enabled)
    first = cfg.optim.schedule_start  # 0, or where an extended run's schedules start again
    total_steps = cfg.optim.max_steps or first + cfg.optim.epochs * feed.plan.steps_per_epoch
    lr_at, tau_at = p.schedules(total_steps, feed.plan.steps_per_epoch)
    start_step, seconds_before = 0, 0.0  # training seconds of the run before this process
    if resume_state is not None:
        start_step, seconds_before = restore(p, resume_state, out, dist, total_steps)
    budget = TimeBudget(cfg.optim.time_budget_s, start_step, first_step=first)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, cfg)
    barrier(dist)
    knn = None
    if val_data and dist.is_main:  # the monitor runs in the main process only; the others never decode for it
        knn = KnnMonitor(feed.collection, feed.images, feed.labels, val_data, feed.pre, cfg, dist.device, progress)
        log(dist, f"kNN monitor: {len(knn.train_images)} memory images, {len(knn.val_images)} queries")
    checkpoints = CheckpointClock(cfg.run.checkpoint_every, cfg.run.checkpoint_every_s)
    logger = RunLogger(out, cfg, dist, total_steps, start_step, progress)
    extra = {"data": str(data), "val_data": val_data}
    feed.start(p.views, start_step, total_steps)
    profiler = _profiler(profile_dir, dist.device.type) if profile_dir and dist.is_main else None
    loss = projection = None
    p.byol.train()
    budget.start()
    with Stop() as stop:  # SIGINT/SIGTERM: checkpoint and stop; the handlers before come back after
        step = start_step
        while step < total_steps:
            t_data = time.perf_counter()
            raw, weight = feed.batch(step)
            logger.window["data"] += time.perf_counter() - t_data
            if raw is not None:  # Python floats: numpy scalars break weights_only loading
                loss, projection = train_step(p, raw, float(lr_at[step]), float(tau_at[step + 1]), weight)
                logger.window["steps"] += 1
            if profiler:
                profiler.step()

            done = step + 1
            # -- a time budget fixes the step count once the speed is known (early in warmup,
            #    where the schedules do not yet depend on it)
            new_total = budget.after_step(done, total_steps, dist)
            if new_total != total_steps:
                first_fit, total_steps = total_steps == budget.configured, new_total  # refits adjust it quietly
                lr_at, tau_at = p.schedules(total_steps, feed.plan.steps_per_epoch)
                cfg.optim.max_steps = total_steps  # what a resume continues with
                if dist.is_main:
                    write_config(out, cfg)
                    logger.bar.total = total_steps
                    if first_fit:
                        log(dist, f"time budget {cfg.optim.time_budget_s:.0f}s: training for about {total_steps} steps")

            if (done % cfg.run.log_every == 0 or done == total_steps) and loss is not None:
                logger.step(done, done / feed.plan.steps_per_epoch, seconds_before + budget.elapsed(),
                            float(lr_at[step]), float(tau_at[done]), feed.skipped, loss, projection)
            logger.advance()
            if stop_after_steps and done - start_step >= stop_after_steps and done < total_steps:
                stop.requested = True
            if checkpoints.due(done) or done == total_steps or stop.requested:
                with logger.excluded() as t:  # the log window's images/s is training speed: saves left out
                    save(out, p, done, dist, {**extra, "train_seconds": seconds_before + budget.elapsed()})
                checkpoints.saved(t.seconds)
            epoch = done // feed.plan.steps_per_epoch
            if knn and done % feed.plan.steps_per_epoch == 0 and cfg.run.knn_every and epoch % cfg.run.knn_every == 0 \
                    and done != total_steps:
                with budget.paused():  # evaluation time is not training time
                    scores = {f"knn_{k}": v for k, v in knn.run(p.byol.encoder).items()}
                logger.write({"step": done, "train_seconds": seconds_before + budget.elapsed(), **scores})
            step = done
            if stop.requested:
                log(dist, f"\nstopped at step {done}; checkpoint written, continue with --resume")
                break
    logger.flush()
    logger.bar.close()
    if profiler:
        profiler.stop()

    summary = {"steps": step, "total_steps": total_steps, "train_seconds": seconds_before + budget.elapsed(),
               "loss": logger.last_loss, "pipeline": feed.pipeline, "precision": p.precision,
               "world_size": dist.world, "checkpoints": checkpoints.count,
               "checkpoint_seconds": round(checkpoints.seconds, 3), "empty_steps": feed.empty_steps}
    if knn and dist.is_main and not stop.requested:
        scores = {f"knn_{k}": v for k, v in knn.run(p.byol.encoder).items()}
        summary.update(scores)
        logger.write({"step": step, "train_seconds": summary["train_seconds"], **scores})
    logger.close()
    if dist.is_main:
        ckpt_io.atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    barrier(dist)
    shutdown(dist)
    return summary


def restore(p: Pretraining, state: dict, out: Path, dist: Dist, total_steps: int) -> tuple[int, float]:
    """Load a checkpoint into the parts of a run; its step and training seconds so far."""
    cfg = p.cfg
    ckpt_io.check_same_model(state["config"], cfg.to_dict(), out / ckpt_io.CHECKPOINT_NAME)
    p.byol.load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    ckpt_io.set_rng_state(state["rng"])
    if dist.rank:  # the checkpoint holds rank 0's generator; the others must differ from it
        seed_process(cfg.run.seed, dist.rank, int(state["step"]))
    start_step, seconds_before = int(state["step"]), float(state.get("train_seconds", 0.0))
    if cfg.optim.schedule_start == start_step:
        log(dist, f"extending {out} from step {start_step} ({seconds_before:.0f}s trained): the LR and tau "
                  f"schedules start again")
    else:
        log(dist, f"resumed {out} at step {start_step}/{total_steps}")
    return start_step, seconds_before


def save(out: Path, p: Pretraining, step: int, dist: Dist, extra: dict) -> None:
    """checkpoint.pt (to resume) and encoder.safetensors (to use), from the main process."""
    if dist.is_main:
        cfg = p.cfg
        ckpt_io.save_checkpoint(out, model=p.byol, optimizer=p.optimizer, step=step, config=cfg.to_dict(),
                                extra=extra)
        ckpt_io.save_encoder(out / ckpt_io.ENCODER_NAME, p.byol.encoder, arch=cfg.model.arch, stem=cfg.model.stem,
                             embedding_dim=p.feature_dim, preprocessing=cfg.data.preprocessing(), step=step)


class RunLogger:
    """metrics.jsonl, TensorBoard and the progress bar (main process), and the log window's speed.

    Logging never synchronises the host with the device: a log step queues its loss and projection
    spread as a non-blocking copy to host memory (DeferredMetrics), written out at the next log step
    (or checkpoint), by when the copy has long finished.
    """

    def __init__(self, out: Path, cfg: Config, dist: Dist, total_steps: int, start_step: int, progress: bool):
        self.cfg, self.dist = cfg, dist
        self.file = open(out / "metrics.jsonl", "a") if dist.is_main else None  # noqa: SIM115 - close()
        self.writer = _tensorboard(out) if dist.is_main else None
        self.bar = progress_bar(total_steps, start_step, progress and dist.is_main, desc="BYOL")
        self.window = {"t0": time.perf_counter(), "steps": 0, "data": 0.0}
        self.pending = DeferredMetrics()
        self.last_loss = float("nan")

    def step(self, done: int, epoch: float, train_seconds: float, lr: float, tau: float, skipped: int,
             loss: torch.Tensor, projection: torch.Tensor) -> None:
        """A log step: the previous record written, this one queued, a new speed window begun."""
        w = self.window
        elapsed = time.perf_counter() - w["t0"]
        record = {"step": done, "epoch": epoch, "train_seconds": round(train_seconds, 2), "lr": lr, "tau": tau,
                  "images_per_s": w["steps"] * self.cfg.optim.batch_size / elapsed,
                  "data_wait": w["data"] / elapsed, "skipped_images": skipped}
        self.flush()
        self.pending.push(record, loss=all_reduce_mean(loss.detach().float(), self.dist),
                          projection_std=_projection_std(projection))
        self.window = {"t0": time.perf_counter(), "steps": 0, "data": 0.0}

    def flush(self) -> None:
        """Writes the record queued one log interval ago (its values long copied to the host)."""
        record = self.pending.pop()
        if record is None:
            return
        self.last_loss = record["loss"]
        if self.dist.is_main:
            _write_metrics(self.file, self.writer, record)
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}")
            if record["projection_std"] < 0.1 / math.sqrt(self.cfg.model.projection_dim):
                log(self.dist, f"warning: step {record['step']}: the representation looks collapsed (per-dimension "
                               f"std of normalised projections {record['projection_std']:.2e}); lower the LR or "
                               f"raise tau")

    def write(self, record: dict) -> None:
        """An evaluation record, written at once (main process)."""
        if self.dist.is_main:
            _write_metrics(self.file, self.writer, record)

    def advance(self) -> None:
        if self.dist.is_main:
            self.bar.update(1)

    @contextlib.contextmanager
    def excluded(self):
        """Time left out of the speed window (a checkpoint); the metrics it covers go to disk before it."""
        self.flush()
        timing = types.SimpleNamespace(seconds=0.0)
        t0 = time.perf_counter()
        try:
            yield timing
        finally:
            timing.seconds = time.perf_counter() - t0
            self.window["t0"] += timing.seconds

    def close(self) -> None:
        if self.dist.is_main:
            self.file.close()
            if self.writer:
                self.writer.close()


class TimeBudget:
    """Turns a wall-clock budget into a step count, measured over steps 3-12 of the run, then again
    and again from the speed since the last fit: at doubling steps (24, 48, ...), then halfway
    through what is left (the first steps run slower than the rest, and other jobs come and go:
    fitted once, a 3-minute run at batch 32 on two shared cores trained for 149 s).

    Only ever shortens the configured run. The warmup LR ramp does not depend on the total, and
    tau barely moves in the first steps; a later refit moves the cosine schedules a little.
    """
    FIRST, LAST = 2, 12

    def __init__(self, seconds: float, start_step: int, first_step: int = 0):
        self.first = first_step  # steps are counted from where the schedules start
        self.seconds, self.active = seconds, seconds > 0 and start_step < first_step + self.LAST
        self.t_begin = self.mark = self.configured = None
        self.excluded = 0.0
        self.next_fit = self.LAST

    def start(self):
        self.t_begin = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds so far (evaluation pauses excluded)."""
        return time.perf_counter() - self.t_begin - self.excluded

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def after_step(self, done: int, total: int, dist: Dist) -> int:
        if not self.active:
            return total
        done_here = done - self.first
        if done_here == self.FIRST:
            _sync_device()  # the loop never waits for the device: the clock readings must
            self.mark = (done_here, self.elapsed())
        if done_here < self.next_fit or self.mark is None:
            return total
        _sync_device()  # (once per fit: a few dozen per run)
        now = self.elapsed()
        per_step = torch.tensor((now - self.mark[1]) / (done_here - self.mark[0]))
        per_step = all_reduce(per_step, dist, "max")  # every process must agree: plan for the slowest
        self.configured = self.configured or total  # a refit may lengthen the run again, never past this
        fitted = max(done + 1, min(self.configured, done + int((self.seconds - now) / per_step.item())))
        self.mark = (done_here, now)
        self.next_fit = done_here + max(self.LAST, min(done_here, (fitted - done) // 2))
        return fitted


class CheckpointClock:
    """When to write a checkpoint: every `every_steps` optimiser steps and/or once `every_s` seconds
    have passed since the last one (0 turns either off). Time, not epochs: a CIFAR epoch lasts a few
    seconds on a GPU, and a checkpoint at each one cost a tenth of the run."""

    def __init__(self, every_steps: int, every_s: float, clock=time.monotonic):
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self.last = clock()
        self.count, self.seconds = 0, 0.0

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        return by_steps or (self.every_s > 0 and self.clock() - self.last >= self.every_s)

    def saved(self, seconds: float) -> None:
        self.last = self.clock()
        self.count += 1
        self.seconds += seconds


def _sync_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


KNN_MAX_BYTES = 2 << 30  # the kNN monitor's memory bank, and its queries, each at most this much uint8


class KnnMonitor:
    """Weighted kNN top-1/top-5 of the online encoder: training images as memory, --val-data as queries.

    Main process only. Memory and queries are each a seeded sample of at most run.knn_max_images
    images (default: what KNN_MAX_BYTES holds; all of CIFAR, ~14k ImageNet images at 224 px), decoded
    once; the memory pipeline's images are reused, never decoded again.
    """

    def __init__(self, train: ImageCollection, train_images, train_labels, val_spec: str, pre, cfg: Config,
                 device, progress):
        val = open_collection(val_spec)
        if train.labels is None or val.labels is None:
            raise DataError("the kNN monitor needs labels on both --data and --val-data "
                            "(class sub-folders, or a torchvision data set)")
        unseen = set(val.classes) - set(train.classes)
        if unseen:
            raise DataError(f"--val-data has classes the training data lacks: {sorted(unseen)[:5]}")
        cap = cfg.run.knn_max_images or KNN_MAX_BYTES // (3 * pre.input_size ** 2)
        if train_images is None:
            train_images, train_labels, _ = decode_all(sample_collection(train, cap, cfg.run.seed), pre,
                                                       cfg.data.workers, progress, "decoding kNN memory")
        elif len(train_images) > cap:
            keep = sample_indices(len(train_images), cap, cfg.run.seed)
            train_images, train_labels = train_images[keep.to(train_images.device)], train_labels[keep]
        self.train_images, self.train_labels = train_images, train_labels
        self.val_images, self.val_labels, _ = decode_all(sample_collection(val, cap, cfg.run.seed + 1), pre,
                                                         cfg.data.workers, progress, "decoding kNN queries")
        if device.type == "cuda":  # pinned: each embedding pass copies them without blocking
            self.val_images = self.val_images.pin_memory()
            if self.train_images.device.type == "cpu":
                self.train_images = self.train_images.pin_memory()
        if train.classes and val.classes:  # align class indices by name
            remap = torch.tensor([train.classes.index(c) for c in val.classes])
            self.val_labels = remap[self.val_labels]
        self.num_classes = max(len(train.classes), int(self.train_labels.max()) + 1)
        self.pre, self.cfg, self.device, self.progress = pre, cfg, device, progress

    def run(self, encoder) -> dict:
        precision = "bf16" if self.cfg.run.precision == "bf16" else "fp32"
        bank = embed(encoder, self.train_images, self.pre, self.device, precision=precision, progress=self.progress,
                     desc="kNN memory")
        queries = embed(encoder, self.val_images, self.pre, self.device, precision=precision, progress=self.progress,
                        desc="kNN queries")
        return knn_accuracy(bank, self.train_labels.to(bank.device), queries, self.val_labels.to(bank.device),
                            self.num_classes, self.cfg.run.knn_k, self.cfg.run.knn_temperature)


def _projection_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the L2-normalised projections (a 0-d tensor; ~1/sqrt(d) when healthy)."""
    return torch.nn.functional.normalize(z.detach().float(), dim=1).std(0).mean()


class DeferredMetrics:
    """One log record whose device scalars are being copied to host memory without waiting.

    push() stacks the scalars and starts a non-blocking copy into pinned memory (CUDA) with an
    event behind it; pop() waits on that event, which by the next log step has long fired, so
    the training loop never stalls the device for its logs. On CPU the values are already there.
    """

    def __init__(self):
        self.pending = None

    def push(self, record: dict, **scalars: torch.Tensor) -> None:
        if self.pending is not None:
            raise RuntimeError("DeferredMetrics holds one record at a time: pop() the previous one first")
        values = torch.stack([v.reshape(()).float() for v in scalars.values()])
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending = (record, list(scalars), values, event)

    def pop(self) -> dict | None:
        if self.pending is None:
            return None
        record, names, values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return {**record, **dict(zip(names, values.tolist(), strict=True))}


def _write_metrics(f, writer, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    if writer:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _profiler(out_dir: str, device_type: str):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=2, warmup=2, active=5, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(out_dir))
    prof.start()
    return prof


# ============================================================================================
def run(out: str | Path, data: str | None = None, *, preset: str | None = None, overrides=(),
        val_data: str | None = None, resume: bool = False, extend: bool = False, progress: bool = True,
        profile_dir: str | None = None, stop_after_steps: int | None = None, **settings) -> dict:
    """Train a BYOL encoder into the run directory `out`: `python -m trainer.pretrain` as a function.

    `preset` names a configuration (default cpu-quick, or the resumed run's own); `overrides` are
    `section.key=value` assignments (--set); `settings` are the command's plain flags by name:
    time_budget (seconds), epochs, max_steps, batch_size, lr, arch, device, workers, seed, compile.
    `resume` continues the run in `out` from its checkpoint (from scratch when there is none yet);
    `extend` trains a finished run on for a further time_budget or max_steps. Returns the summary
    (also written to out/summary.json); bad input raises UsageError, DataError or CheckpointError.
    """
    out = Path(out)
    unknown = set(settings) - set(FLAG_TO_SETTING)
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(sorted(unknown))}; use overrides for "
                         f"section.key=value settings")
    if extend and not (out / ckpt_io.CHECKPOINT_NAME).is_file():
        raise UsageError(f"--extend: no run to extend in {out} (no {ckpt_io.CHECKPOINT_NAME})")
    if extend and not (settings.get("time_budget") or settings.get("max_steps")):
        raise UsageError("--extend needs --time-budget or --max-steps: how much longer to train")
    state = open_run(out, resume or extend)
    if state is not None:
        data = data or state.get("data")  # the run remembers its data
        val_data = val_data or state.get("val_data")
    cfg = resolve_config(preset, overrides, settings, state["config"] if state else None)
    if extend:  # the budget and the step count given are on top of what the run has done
        cfg.optim.schedule_start = int(state["step"])
        max_steps = settings.get("max_steps")
        cfg.optim.max_steps = cfg.optim.schedule_start + max_steps if max_steps else 0
        cfg.optim.time_budget_s = settings.get("time_budget") or 0.0
    if not data:
        raise UsageError("--data is required (an image folder, a zip archive, or cifar10/cifar100/stl10)")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise UsageError("--stop-after-steps must be at least 1")
    return train(cfg, str(data), out, resume_state=state, val_data=None if val_data is None else str(val_data),
                 progress=progress, profile_dir=profile_dir, stop_after_steps=stop_after_steps)


@cli_main(errors=(ValueError,))
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    summary = run(args.out, args.data, preset=args.preset, overrides=args.set, val_data=args.val_data,
                  resume=args.resume, extend=args.extend, progress=not args.no_progress, profile_dir=args.profile,
                  stop_after_steps=args.stop_after_steps, **{flag: getattr(args, flag) for flag in FLAG_TO_SETTING})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
