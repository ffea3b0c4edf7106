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
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .augment import BatchAugment, byol_views
from .config import PRESETS, Config, apply_override, preset
from .data import (
    BatchPlan,
    DataError,
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

MEMORY_PIPELINE_MAX_BYTES = 4 << 30  # decode into RAM when the uint8 images fit in 4 GiB


class UsageError(ValueError):
    """A bad command line or input, reported as one line before any work starts."""


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
    p.add_argument("--data", help="(required unless resuming) image folder (class sub-folders optional), zip archive of one, "
                   "or a torchvision data set: cifar10, cifar100, stl10 (downloaded when online)")
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


FLAG_TO_SETTING = {"time_budget": "optim.time_budget_s", "epochs": "optim.epochs", "max_steps": "optim.max_steps", "batch_size": "optim.batch_size",
                   "lr": "optim.base_lr", "arch": "model.arch", "device": "run.device",
                   "workers": "data.workers", "seed": "run.seed", "compile": "run.compile"}


def resolve_config(args, saved: dict | None = None) -> Config:
    """Preset (or the resumed run's config), then --set overrides, then the plain flags."""
    if args.preset is None and saved is not None:
        cfg = Config.from_dict(saved)
    else:
        cfg = preset(args.preset or "cpu-quick")
    for assignment in args.set:
        apply_override(cfg, assignment)
    for flag, setting in FLAG_TO_SETTING.items():
        value = getattr(args, flag)
        if value is not None:
            apply_override(cfg, f"{setting}={json.dumps(value)}")
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
# Training
# ============================================================================================
class Stop:
    """SIGINT/SIGTERM: finish the current step, write a checkpoint, exit."""

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True


def log(dist: Dist, msg: str) -> None:
    """A message on stderr from the main process, printed above the progress bar."""
    if dist.is_main:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def train(cfg: Config, data: str, out: Path, resume_state: dict | None = None, val_data: str | None = None,
          progress: bool = True, profile_dir: str | None = None, stop_after_steps: int | None = None) -> dict:
    """Train BYOL; `resume_state` is a loaded checkpoint to continue from."""
    # ---- 1. processes, device, precision, seeds ----------------------------------------------
    want = cfg.run.device
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    dist = init_distributed(device_type)
    validate(cfg, dist)
    device = dist.device
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    torch.manual_seed(cfg.run.seed + dist.rank)  # each process augments differently
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- 2. data ------------------------------------------------------------------------------
    collection = open_collection(data)
    plan = BatchPlan(len(collection), cfg.optim.batch_size, cfg.run.seed, dist.rank, dist.world)
    if plan.steps_per_epoch == 0:
        raise DataError("no full batch fits in the data set; lower --batch-size")
    pre = cfg.data.train_preprocessing()  # the encoder saved carries cfg.data.preprocessing()
    size = cfg.data.image_size
    pipeline = cfg.data.pipeline
    if pipeline == "auto":
        fits = len(collection) * 3 * pre.resize_size ** 2 <= MEMORY_PIPELINE_MAX_BYTES
        pipeline = "memory" if fits and size <= 96 else "stream"
    views = byol_views(blur=cfg.data.blur, crop_scale=(cfg.data.crop_scale_min, 1.0),
                       color_strength=cfg.data.color_strength, grayscale_p=cfg.data.grayscale_p)
    augment = BatchAugment(views, size, pre.mean, pre.std, crop=(pipeline == "memory")).to(device)
    images = labels = None
    if pipeline == "memory":
        t0 = time.perf_counter()
        images, labels, skipped = decode_all(collection, pre, workers=cfg.data.workers,
                                             progress=progress and dist.is_main, desc="decoding images into memory")
        if skipped:
            log(dist, f"skipped {skipped} unreadable image(s) of {len(collection)}")
        images = images.to(device)
        plan = BatchPlan(len(images), cfg.optim.batch_size, cfg.run.seed, dist.rank, dist.world, device)
        log(dist, f"decoded {len(images)} images ({collection.description}) in {time.perf_counter() - t0:.1f}s")

    # ---- 3. networks --------------------------------------------------------------------------
    encoder, feature_dim = build_encoder(cfg.model.arch, cfg.model.stem)
    model = BYOL(encoder, feature_dim, cfg.model.projector_hidden_dim, cfg.model.projection_dim,
                 cfg.model.predictor_hidden_dim)
    if dist.enabled and device_type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    byol = model
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device_type == "cuda" else None)
    forward = torch.compile(model) if cfg.run.compile else model

    # ---- 4. optimiser and schedules (precomputed per step) ------------------------------------
    groups = (parameter_groups([byol.encoder, byol.projector], cfg.optim.weight_decay)
              + parameter_groups([byol.predictor], cfg.optim.weight_decay, cfg.optim.predictor_lr_scale))
    lr_peak = cfg.optim.base_lr * cfg.optim.batch_size / 256
    optimizer = build_optimizer(cfg.optim.name, groups, lr_peak, cfg.optim.momentum, cfg.optim.weight_decay,
                                cfg.optim.trust_coefficient)
    first = cfg.optim.schedule_start  # 0, or where an extended run's schedules start again
    total_steps = cfg.optim.max_steps or first + cfg.optim.epochs * plan.steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * plan.steps_per_epoch))

    def schedules(total: int):
        """Per-step LR and tau over the whole run, indexed by the global step."""
        lr = warmup_cosine(lr_peak, total - first, warmup_steps)
        tau = tau_schedule(cfg.byol.tau_base, total - first)
        return np.concatenate([np.zeros(first), lr]), np.concatenate([np.ones(first), tau])
    lr_at, tau_at = schedules(total_steps)
    budget = TimeBudget(cfg.optim.time_budget_s, start_step=0, first_step=first)
    seconds_before = 0.0  # training seconds of the run before this process (a resumed or extended run)

    # ---- 5. run directory and resume ----------------------------------------------------------
    start_step = 0
    if resume_state is not None:
        state = resume_state
        ckpt_io.check_same_model(state["config"], cfg.to_dict(), out / ckpt_io.CHECKPOINT_NAME)
        byol.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt_io.set_rng_state(state["rng"])
        if dist.rank:  # the checkpoint holds rank 0's generator; the others must differ from it
            torch.manual_seed(cfg.run.seed + dist.rank + 7919 * int(state["step"]))
        start_step = int(state["step"])
        seconds_before = float(state.get("train_seconds", 0.0))
        budget = TimeBudget(cfg.optim.time_budget_s, start_step, first_step=first)
        if first == start_step:
            log(dist, f"extending {out} from step {start_step} ({seconds_before:.0f}s trained): the LR and tau "
                      f"schedules start again")
        else:
            log(dist, f"resumed {out} at step {start_step}/{total_steps}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(cfg.dumps()))
    barrier(dist)

    knn_data = None
    if val_data and dist.is_main:  # the monitor runs in the main process only; the others never decode for it
        knn_data = KnnMonitor(collection, images, labels, val_data, pre, cfg, device, progress)
        log(dist, f"kNN monitor: {len(knn_data.train_images)} memory images, {len(knn_data.val_images)} queries")
    checkpoints = CheckpointClock(cfg.run.checkpoint_every, cfg.run.checkpoint_every_s)

    def save(step: int):
        write_logged()  # a checkpoint synchronises anyway: the metrics it covers go to disk before it
        t0 = time.perf_counter()
        if dist.is_main:
            ckpt_io.save_checkpoint(out, model=byol, optimizer=optimizer, step=step, config=cfg.to_dict(),
                                    extra={"data": str(data), "val_data": val_data,
                                           "train_seconds": seconds_before + budget.elapsed()})
            ckpt_io.save_encoder(out / ckpt_io.ENCODER_NAME, byol.encoder, arch=cfg.model.arch,
                                 stem=cfg.model.stem, embedding_dim=feature_dim,
                                 preprocessing=cfg.data.preprocessing(), step=step)
        checkpoints.saved(time.perf_counter() - t0)
        window["t0"] += time.perf_counter() - t0  # the log window's images/s is training speed: saves left out

    # ---- 6. the training loop -----------------------------------------------------------------
    metrics_file = open(out / "metrics.jsonl", "a") if dist.is_main else None
    writer = _tensorboard(out) if dist.is_main else None
    stop = Stop()
    stop.install()
    batches = None
    if pipeline == "stream":
        batches = prefetch_to_device(stream_loader(collection, plan, size, views, cfg.run.seed, start_step,
                                                   total_steps, cfg.data.workers, pin_memory=device_type == "cuda"),
                                     device)
    amp = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    micro = cfg.optim.accumulate
    profiler = _profiler(profile_dir, device_type) if profile_dir and dist.is_main else None
    bar = _progress_bar(total_steps, start_step, progress and dist.is_main)
    window = {"t0": time.perf_counter(), "steps": 0, "data": 0.0, "skipped": 0}
    empty_steps = 0  # steps whose images were all unreadable: counted, but no update
    loss = projection = None
    last_loss = float("nan")
    logged = DeferredMetrics()

    def write_logged():
        """Writes the record whose device values were queued one log interval ago (they are long
        copied by now, so reading them does not stall the device)."""
        nonlocal last_loss
        record = logged.pop()
        if record is None:
            return
        last_loss = record["loss"]
        if dist.is_main:
            _write_metrics(metrics_file, writer, record)
            bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{record['images_per_s']:.0f}",
                            lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}")
            if record["projection_std"] < 0.1 / math.sqrt(cfg.model.projection_dim):
                log(dist, f"warning: step {record['step']}: the representation looks collapsed (per-dimension "
                          f"std of normalised projections {record['projection_std']:.2e}); lower the LR or "
                          f"raise tau")
    byol.train()
    budget.start()
    step = start_step
    while step < total_steps:
        # -- data: a batch of two augmented views
        t_data = time.perf_counter()
        weight = 1.0
        if pipeline == "memory":
            raw = images[plan.indices(step)]
        else:
            # unreadable images are left out by the loader; the batch is refilled to its full size from
            # the readable ones (fixed shapes; never a BatchNorm batch of one). With none readable the
            # step still counts but changes nothing: skipped alone, or (DDP, whose gradient all-reduce
            # needs every process) run on a blank batch with a zero loss weight
            raw, skipped = next(batches)
            window["skipped"] += skipped
            raw = fill_batch(raw, plan.local_batch)
            if raw is None:
                empty_steps += 1
                if dist.enabled:
                    raw = torch.zeros((plan.local_batch, 2, 3, size, size), dtype=torch.uint8, device=device)
                    weight = 0.0
        window["data"] += time.perf_counter() - t_data

        if raw is not None:
            for g in optimizer.param_groups:
                g["lr"] = float(lr_at[step]) * g["lr_scale"]  # Python floats: numpy scalars break weights_only loading

            # -- forward and backward, optionally over several micro-batches
            for k, chunk in enumerate(raw.chunk(micro)):
                view1, view2 = augment(chunk)
                sync = contextlib.nullcontext() if (not dist.enabled or k == micro - 1) else model.no_sync()
                with sync:
                    with amp:
                        loss, projection = forward(view1, view2)
                    (loss * (weight / micro)).backward()

            # -- optimiser step, then the target moves towards the online network
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            byol.update_target(float(tau_at[step + 1]))
            window["steps"] += 1
        if profiler:
            profiler.step()

        done = step + 1
        # -- a time budget fixes the step count once the speed is known (early in warmup,
        #    where the schedules do not yet depend on it)
        new_total = budget.after_step(done, total_steps, dist)
        if new_total != total_steps:
            first_fit, total_steps = total_steps == budget.configured, new_total  # refits adjust it quietly
            lr_at, tau_at = schedules(total_steps)
            cfg.optim.max_steps = total_steps  # what a resume continues with
            if dist.is_main:
                ckpt_io.atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(cfg.dumps()))
                bar.total = total_steps
                if first_fit:
                    log(dist, f"time budget {cfg.optim.time_budget_s:.0f}s: training for about {total_steps} steps")

        # -- logging without host synchronisation: the loss and projection spread are queued as a
        #    non-blocking copy to host memory and written out at the next log step (or checkpoint)
        if (done % cfg.run.log_every == 0 or done == total_steps) and loss is not None:
            elapsed = time.perf_counter() - window["t0"]
            record = {"step": done, "epoch": done / plan.steps_per_epoch,
                      "train_seconds": round(seconds_before + budget.elapsed(), 2),
                      "lr": float(lr_at[step]), "tau": float(tau_at[done]),
                      "images_per_s": window["steps"] * cfg.optim.batch_size / elapsed,
                      "data_wait": window["data"] / elapsed, "skipped_images": window["skipped"]}
            write_logged()
            logged.push(record, loss=all_reduce_mean(loss.detach().float(), dist),
                        projection_std=_projection_std(projection))
            window = {"t0": time.perf_counter(), "steps": 0, "data": 0.0, "skipped": window["skipped"]}
        if dist.is_main:
            bar.update(1)

        epoch_end = done % plan.steps_per_epoch == 0
        if stop_after_steps and done - start_step >= stop_after_steps and done < total_steps:
            stop.requested = True
        if checkpoints.due(done) or done == total_steps or stop.requested:
            save(done)
        if knn_data and epoch_end and cfg.run.knn_every and (done // plan.steps_per_epoch) % cfg.run.knn_every == 0 \
                and done != total_steps:
            if dist.is_main:
                with budget.paused():  # evaluation time is not training time
                    scores = {f"knn_{k}": v for k, v in knn_data.run(byol.encoder).items()}
                _write_metrics(metrics_file, writer, {"step": done, "train_seconds": seconds_before + budget.elapsed(),
                                                      **scores})
        step = done
        if stop.requested:
            log(dist, f"\nstopped at step {done}; checkpoint written, continue with --resume")
            break
    write_logged()
    bar.close()
    if profiler:
        profiler.stop()

    # ---- 7. final evaluation and summary ------------------------------------------------------
    summary = {"steps": step, "total_steps": total_steps, "train_seconds": seconds_before + budget.elapsed(),
               "loss": last_loss, "pipeline": pipeline, "precision": precision, "world_size": dist.world,
               "checkpoints": checkpoints.count, "checkpoint_seconds": round(checkpoints.seconds, 3),
               "empty_steps": empty_steps}
    if knn_data and dist.is_main and not stop.requested:
        summary.update({f"knn_{k}": v for k, v in knn_data.run(byol.encoder).items()})
        _write_metrics(metrics_file, writer, {"step": step, "train_seconds": summary["train_seconds"], **{k: summary[k] for k in summary if k.startswith("knn")}})
    if dist.is_main:
        metrics_file.close()
        if writer:
            writer.close()
        ckpt_io.atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    barrier(dist)
    shutdown(dist)
    return summary


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


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="BYOL", unit="step", disable=not enabled, dynamic_ncols=True)


def _profiler(out_dir: str, device_type: str):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=2, warmup=2, active=5, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(out_dir))
    prof.start()
    return prof


# ============================================================================================
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    try:
        state = None
        if args.extend and not (out / ckpt_io.CHECKPOINT_NAME).is_file():
            raise UsageError(f"--extend: no run to extend in {out} (no {ckpt_io.CHECKPOINT_NAME})")
        if args.extend and not (args.time_budget or args.max_steps):
            raise UsageError("--extend needs --time-budget or --max-steps: how much longer to train")
        if (args.resume or args.extend) and (out / ckpt_io.CHECKPOINT_NAME).is_file():
            state = ckpt_io.load_checkpoint(out / ckpt_io.CHECKPOINT_NAME)
            args.data = args.data or state.get("data")  # the run remembers its data
            args.val_data = args.val_data or state.get("val_data")
        elif args.resume:
            print(f"--resume: no checkpoint in {out} yet, starting from scratch", file=sys.stderr)
        elif (out / ckpt_io.CHECKPOINT_NAME).exists():
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
        cfg = resolve_config(args, state["config"] if state else None)
        if args.extend:  # the budget and the step count given are on top of what the run has done
            cfg.optim.schedule_start = int(state["step"])
            cfg.optim.max_steps = cfg.optim.schedule_start + args.max_steps if args.max_steps else 0
            cfg.optim.time_budget_s = args.time_budget or 0.0
        if not args.data:
            raise UsageError("--data is required (an image folder, a zip archive, or cifar10/cifar100/stl10)")
        if args.stop_after_steps is not None and args.stop_after_steps < 1:
            raise UsageError("--stop-after-steps must be at least 1")
        summary = train(cfg, args.data, out, resume_state=state, val_data=args.val_data,
                        progress=not args.no_progress, profile_dir=args.profile,
                        stop_after_steps=args.stop_after_steps)
    except (UsageError, DataError, ckpt_io.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
