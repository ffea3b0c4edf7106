"""Training speed of one BYOL step for a named preset, broken down by phase, on CPU or GPU.

    python benchmarks/pretrain_speed.py --preset cpu-quick --device cpu --steps 30 --json speed_cpu.json
    python benchmarks/pretrain_speed.py --preset imagenet-resnet50 --device cuda --batch-size 256 --steps 50

The step is trainer.pretrain's own: the parts from trainer.pretrain.build_pretraining (networks,
channels_last, batched augmentation, the optimiser over its parameter groups, bf16 autocast where
the preset asks for it, optional torch.compile) and the step trainer.pretrain.train_step, at the
schedule's peak LR, on a memory-pipeline batch of uint8 images held on the device: random ones
(--num-images), or --data decoded once through the preset's preprocessing contract.

Phases of each step:
  data       the batch's images gathered from device memory (the memory pipeline's data wait)
  augment    BatchAugment: both views' crop, flip and photometric operations, batched
  forward    online and target networks on both views, the loss
  backward   loss.backward()
  optimizer  optimizer.step() and zero_grad()
  ema        the target network's momentum update

On GPU the phases are timed with CUDA events (no host synchronisation inside the timed steps;
one synchronize before and after) and the images/s comes from the wall clock over all timed
steps. On CPU plain timers suffice (the work is synchronous). The FLOPs of one training step
(forward + backward of the networks; the augmentations are not matrix work) are counted once
with torch.utils.flop_counter.FlopCounterMode; on a GPU whose peak is known (table below, or
--peak-flops) the model FLOPs utilisation is MFU = FLOPs per step x steps/s / peak bf16 dense FLOPs.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, now, write_json

from trainer.config import PRESETS, apply_override, preset
from trainer.pretrain import build_pretraining, train_step

PHASES = ("data", "augment", "forward", "backward", "optimizer", "ema")

# Peak dense bf16 tensor FLOP/s from the vendors' data sheets (no sparsity), matched against
# torch.cuda.get_device_name(); the first key contained in the name wins.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H100": 756e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "RTX 6000 Ada": 364e12, "RTX A6000": 155e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops_for(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


class PhaseTimer:
    """Accumulates per-phase time: CUDA events on a GPU (read after the run), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: dict[str, list] = {p: [] for p in PHASES}
        self.seconds: dict[str, list[float]] = {p: [] for p in PHASES}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name].append(time.perf_counter() - t0)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each phase (call after synchronising the device); a phase timed
        once per micro-batch (optim.accumulate > 1) counts all of a step's."""
        if self.cuda:
            return {p: sum(s.elapsed_time(e) for s, e in self.events[p]) / steps for p in PHASES}
        return {p: 1000 * sum(self.seconds[p]) / steps for p in PHASES}


def _no_phase(name: str):
    return contextlib.nullcontext()


class Step:
    """One training step of trainer.pretrain (memory pipeline): its build_pretraining and train_step,
    the batch drawn from the images in device memory; each phase timed when given a PhaseTimer."""

    def __init__(self, cfg, device: torch.device, images: torch.Tensor, seed: int):
        torch.manual_seed(seed)
        self.parts = build_pretraining(cfg, device, crop=True)
        self.byol = self.parts.byol.train()
        self.precision = self.parts.precision
        self.images, self.batch = images, cfg.optim.batch_size
        self.lr, self.tau = self.parts.lr_peak, cfg.byol.tau_base
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, timer: PhaseTimer | None = None):
        phase = timer.phase if timer else _no_phase
        with phase("data"):
            idx = torch.randint(0, len(self.images), (self.batch,), device=self.images.device, generator=self.gen)
            raw = self.images[idx]
        loss, _ = train_step(self.parts, raw, self.lr, self.tau, phase=phase)
        return loss


def count_step_flops(step: Step) -> int:
    """FLOPs of one training step (matrix multiplies and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    parts = step.parts
    compiled, parts.forward = parts.forward, parts.byol  # counted on the eager model (same arithmetic)
    try:
        with counter:
            step()
    finally:
        parts.forward = compiled
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_images(cfg, args, device: torch.device) -> tuple[torch.Tensor, str]:
    pre = cfg.data.preprocessing()
    if args.data:
        from trainer.data import decode_all, open_collection
        collection = open_collection(args.data)
        images, _, _ = decode_all(collection, pre, workers=args.workers, progress=False)
        source = f"{collection.description} ({len(images)} images)"
    else:
        g = torch.Generator().manual_seed(args.seed)
        s = pre.resize_size
        images = torch.randint(0, 256, (args.num_images, 3, s, s), dtype=torch.uint8, generator=g)
        source = f"random uint8 images ({args.num_images} x {s} px)"
    if len(images) < cfg.optim.batch_size:
        raise SystemExit(f"error: {len(images)} images are fewer than the batch size {cfg.optim.batch_size}")
    return images.to(device), source


def measure(cfg, device: torch.device, args) -> dict:
    """Warm-up steps, one counted step, then `args.steps` timed steps -> the results dict."""
    images, source = load_images(cfg, args, device)
    step = Step(cfg, device, images, args.seed)
    for _ in range(args.warmup):  # allocator growth, cudnn autotuning, oneDNN kernel choice, compilation
        step()
    flops = count_step_flops(step)
    timer = PhaseTimer(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(timer)
    sync(device)
    wall = time.perf_counter() - t0
    phases = timer.per_step_ms(args.steps)
    step_ms = 1000 * wall / args.steps
    result = {
        "preset": cfg.preset, "arch": cfg.model.arch, "stem": cfg.model.stem, "image_size": cfg.data.image_size,
        "batch_size": cfg.optim.batch_size, "precision": step.precision, "channels_last": cfg.run.channels_last,
        "compile": cfg.run.compile, "optimizer": cfg.optim.name, "device": str(device), "data": source,
        "steps": args.steps, "warmup": args.warmup, "wall_s": wall,
        "images_per_s": args.steps * cfg.optim.batch_size / wall, "step_ms": step_ms,
        "phases_ms": phases, "phase_share": {p: v / sum(phases.values()) for p, v in phases.items()},
        "data_wait_fraction": phases["data"] / step_ms, "final_loss": float(loss.detach()),
        "flops_per_step": flops, "achieved_flops_per_s": flops * args.steps / wall,
    }
    peak = args.peak_flops
    if peak is None and device.type == "cuda":
        peak = peak_flops_for(torch.cuda.get_device_name(device))
    result["peak_bf16_flops"] = peak
    result["mfu"] = result["achieved_flops_per_s"] / peak if peak else None
    return result


def build_config(args):
    cfg = preset(args.preset)
    for assignment in args.set:
        apply_override(cfg, assignment)
    if args.batch_size is not None:
        cfg.optim.batch_size = args.batch_size
    if args.compile:
        cfg.run.compile = True
    if args.precision:
        cfg.run.precision = args.precision
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-quick", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: the preset's")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--data", default=None, help="images to decode into memory (default: random images)")
    p.add_argument("--num-images", type=int, default=1024, help="random images held on the device")
    p.add_argument("--workers", type=int, default=2, help="decoding workers for --data")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the device's peak bf16 dense FLOP/s for the MFU (default: from the GPU's name)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset setting, e.g. --set data.image_size=16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.data and not Path(args.data).exists():
        p.error(f"no such file or folder: {args.data}")
    try:
        cfg = build_config(args)
    except ValueError as e:
        p.error(str(e))
    if cfg.optim.batch_size < 2:
        p.error("the batch size must be at least 2 (BatchNorm)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    result = measure(cfg, device, args)
    out = {"date": now(), "machine": machine(), **result}
    print(f"{cfg.preset}: {cfg.model.arch} at {cfg.data.image_size} px, batch {cfg.optim.batch_size}, "
          f"{result['precision']}, {device}: {result['images_per_s']:.1f} images/s, "
          f"{result['step_ms']:.1f} ms/step")
    for name in PHASES:
        print(f"  {name:10s} {result['phases_ms'][name]:9.2f} ms  {100 * result['phase_share'][name]:5.1f}%")
    print(f"  {result['flops_per_step'] / 1e9:.1f} GFLOP per step, "
          f"{result['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s achieved"
          + (f", MFU {100 * result['mfu']:.1f}% of {result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s"
             if result["mfu"] is not None else ""))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
