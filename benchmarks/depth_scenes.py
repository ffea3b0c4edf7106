"""Depth transfer on generated scenes: a BYOL encoder against the same architecture randomly initialised.

The official CPU run (BENCHMARKS.md), from the repository root:

    /work/bench/quiet-run /work/main/.venv/bin/python benchmarks/depth_scenes.py \\
        --out /work/bench/depth/scenes --json /work/bench/depth/depth_scenes.json

Three steps, all the real commands:
  1. generate scenes (trainer.synthetic.write_depth_scenes, 64 px): --pretrain-images photos for
     BYOL (their depth is thrown away), --train / --val photo+depth pairs for fine-tuning, each
     set from its own seed;
  2. `python -m trainer.pretrain` on the pretraining photos, no depth (the cpu-quick recipe on a
     half-width ResNet-18 with the ImageNet stem at 64 px, --pretrain-budget of wall time);
  3. `python -m trainer.depth` twice with the same flags and seed; only --encoder differs: the BYOL
     run, and `random:<that run>` (same architecture, stem and preprocessing, fresh weights).
The JSON holds every metric of both runs, the mean-depth floor, wall times and the exact commands.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(command: list[str]) -> float:
    """Run a command from the repository root; its wall time in seconds (exits on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[1:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_depth(flags: list[str], out: Path) -> dict:
    """One `python -m trainer.depth` run -> its final metrics, the mean-depth floor, wall time, command."""
    command = [sys.executable, "-m", "trainer.depth", "--no-progress", *flags, "--out", str(out)]
    seconds = run(command)
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    return {**{k: final[k] for k in METRICS}, "train_loss": final["train_loss"],
            "loss_by_epoch": [round(h["train_loss"], 4) for h in metrics["history"]],
            "baseline_mean_depth": metrics["baseline_mean_depth"], "seconds": round(seconds, 1),
            "train_seconds": round(final["train_seconds"], 1), "backbone": metrics["backbone"],
            "command": " ".join(command[1:])}


def compare(encoder: str, data_flags: list[str], schedule: list[str], out: Path) -> dict:
    """BYOL-initialised against random-initialised encoder, same schedule, same seed."""
    random_spec = encoder if encoder.startswith("random:") else f"random:{encoder}"
    runs = {}
    for name, spec in (("byol", encoder), ("random", random_spec)):
        runs[name] = run_depth(["--encoder", spec, *data_flags, *schedule], out / name)
        r = runs[name]
        print(f"{name:7s} abs rel {r['abs_rel']:.4f}  RMSE {r['rmse']:.4f}  delta1 {r['delta1']:.4f}  "
              f"({r['seconds']:.0f} s)", file=sys.stderr)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="scratch folder (data, the BYOL run, two depth runs)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pretrain-images", type=int, default=1500)
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--val", type=int, default=80)
    p.add_argument("--pretrain-budget", default="4m")
    p.add_argument("--arch", default="resnet18_w32")
    p.add_argument("--decoder", default="upproj")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty; choose a new --out")
    sys.path.insert(0, str(ROOT))
    from trainer.synthetic import write_depth_scenes
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    data = args.out / "data"
    write_depth_scenes(data / "pretrain", args.pretrain_images, args.size, seed=100)
    write_depth_scenes(data / "train", args.train, args.size, seed=1)
    write_depth_scenes(data / "val", args.val, args.size, seed=2)
    generate_seconds = time.perf_counter() - t0

    byol = args.out / "byol"
    pretrain = [sys.executable, "-m", "trainer.pretrain", "--preset", "cpu-quick", "--data",
                str(data / "pretrain" / "rgb"), "--arch", args.arch, "--set", "model.stem=imagenet",
                "--set", f"data.image_size={args.size}", "--set", "data.mean=[0.485,0.456,0.406]",
                "--set", "data.std=[0.229,0.224,0.225]", "--set", "data.workers=1", "--batch-size", "64",
                "--epochs", "400", "--time-budget", args.pretrain_budget, "--no-progress", "--out", str(byol)]
    pretrain_seconds = run(pretrain)

    schedule = ["--decoder", args.decoder, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--base-size", str(args.size), "--crop-size", str(args.size - 8),
                "--workers", "0", "--seed", str(args.seed), "--eval-every", "0", "--draw", "4", "--device", "cpu"]
    data_flags = ["--train", str(data / "train"), "--val", str(data / "val")]
    runs = compare(str(byol), data_flags, schedule, args.out / "depth")
    result = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
              "settings": {k: str(v) for k, v in vars(args).items()},
              "generate_seconds": round(generate_seconds, 1), "pretrain_seconds": round(pretrain_seconds, 1),
              "pretrain_command": " ".join(pretrain[1:]), "runs": runs,
              "byol_minus_random": {k: runs["byol"][k] - runs["random"][k] for k in METRICS}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("date", "byol_minus_random")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
