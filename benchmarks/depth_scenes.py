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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import byol_against_random, finetune, machine, now, report_transfer, run_command

METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")


def run_depth(flags: list[str], out: Path) -> dict:
    """One `python -m trainer.depth` run -> its final metrics, the mean-depth floor, wall time, command."""
    metrics, seconds, command = finetune("depth", flags, out)
    final = metrics["final"]
    return {**{k: final[k] for k in METRICS}, "train_loss": final["train_loss"],
            "loss_by_epoch": [round(h["train_loss"], 4) for h in metrics["history"]],
            "baseline_mean_depth": metrics["baseline_mean_depth"], "seconds": round(seconds, 1),
            "train_seconds": round(final["train_seconds"], 1), "backbone": metrics["backbone"], "command": command}


def compare(encoder: str, data_flags: list[str], schedule: list[str], out: Path) -> dict:
    """BYOL-initialised against random-initialised encoder, same schedule, same seed."""
    return byol_against_random(encoder, lambda spec, o: run_depth(["--encoder", spec, *data_flags, *schedule], o),
                               out, lambda r: f"abs rel {r['abs_rel']:.4f}  RMSE {r['rmse']:.4f}  "
                                              f"delta1 {r['delta1']:.4f}")


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
    from trainer.synthetic import write_depth_scenes
    started = now()
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
    pretrain_seconds = run_command(pretrain)

    schedule = ["--decoder", args.decoder, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--base-size", str(args.size), "--crop-size", str(args.size - 8),
                "--workers", "0", "--seed", str(args.seed), "--eval-every", "0", "--draw", "4", "--device", "cpu"]
    data_flags = ["--train", str(data / "train"), "--val", str(data / "val")]
    runs = compare(str(byol), data_flags, schedule, args.out / "depth")
    result = {"date": started, "machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
              "generate_seconds": round(generate_seconds, 1), "pretrain_seconds": round(pretrain_seconds, 1),
              "pretrain_command": " ".join(pretrain[1:])}
    return report_transfer(args.json, result, runs, METRICS)


if __name__ == "__main__":
    sys.exit(main())
