"""Segmentation transfer on coco256: a BYOL encoder against the same architecture randomly initialised.

The official CPU run (BENCHMARKS.md), from the repository root:

    /work/bench/quiet-run /work/main/.venv/bin/python benchmarks/segment_coco.py \\
        --data ../shared/data/coco256 --encoder /work/bench/cpu_quick_run \\
        --out /work/bench/segment/coco --json /work/bench/segment/segment_coco.json

Both runs are the real command (`python -m trainer.segment`) with the same flags and seed; only
--encoder differs: the BYOL run directory, and `random:<that run>` (same architecture, stem and
preprocessing, fresh weights). Train on train2017 (the 100 photos with masks), evaluate on val2017
(100), classes from masks/classes.json (133 COCO panoptic classes, 0 ignored). The JSON holds
each run's mIoU, pixel accuracy, the best-scored classes, wall time, and the exact commands.
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


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_segment(flags: list[str], out: Path) -> dict:
    """One `python -m trainer.segment` run; returns its final metrics, wall time and command."""
    command = [sys.executable, "-m", "trainer.segment", "--no-progress", *flags, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"trainer.segment failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    ious = sorted(((v, k) for k, v in final["iou"].items() if v is not None), reverse=True)
    train_seconds = final["train_seconds"]
    return {"mean_iou": final["mean_iou"], "pixel_accuracy": final["pixel_accuracy"],
            "classes_scored": final["classes_scored"], "train_loss": final["train_loss"],
            "best_classes": {k: v for v, k in ious[:8]}, "seconds": round(seconds, 1),
            "train_seconds": round(train_seconds, 1), "backbone": metrics["backbone"],
            "command": " ".join(command[1:])}


def compare(encoder: str, data_flags: list[str], schedule: list[str], out: Path) -> dict:
    """BYOL-initialised against random-initialised backbone, same schedule, same seed."""
    random_spec = encoder if encoder.startswith("random:") else f"random:{encoder}"
    runs = {}
    for name, spec in (("byol", encoder), ("random", random_spec)):
        runs[name] = run_segment(["--encoder", spec, *data_flags, *schedule], out / name)
        print(f"{name:7s} mIoU {runs[name]['mean_iou']:.4f}  pixel accuracy {runs[name]['pixel_accuracy']:.4f}  "
              f"({runs[name]['seconds']:.0f} s)", file=sys.stderr)
    return runs


def coco_flags(data: Path) -> list[str]:
    return ["--train-images", str(data / "images/train2017"), "--train-masks", str(data / "masks/train2017"),
            "--val-images", str(data / "images/val2017"), "--val-masks", str(data / "masks/val2017"),
            "--classes", str(data / "masks/classes.json")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the coco256 folder")
    p.add_argument("--encoder", required=True, help="the BYOL encoder (run directory or file)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder for the two run directories")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--head", default="fcn")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--base-size", type=int, default=96)
    p.add_argument("--crop-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty; choose a new --out")
    schedule = ["--head", args.head, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--base-size", str(args.base_size), "--crop-size", str(args.crop_size),
                "--workers", str(args.workers), "--seed", str(args.seed), "--eval-every", "0", "--draw", "4",
                "--device", "cpu"]
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = compare(args.encoder, coco_flags(args.data), schedule, args.out)
    result = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "settings": {
        **{k: str(v) for k, v in vars(args).items()}}, "runs": runs,
        "byol_minus_random": {k: runs["byol"][k] - runs["random"][k] for k in ("mean_iou", "pixel_accuracy")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("date", "byol_minus_random")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
