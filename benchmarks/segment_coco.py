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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import byol_against_random, finetune, machine, now, report_transfer

METRICS = ("mean_iou", "pixel_accuracy")


def run_segment(flags: list[str], out: Path) -> dict:
    """One `python -m trainer.segment` run; returns its final metrics, wall time and command."""
    metrics, seconds, command = finetune("segment", flags, out)
    final = metrics["final"]
    ious = sorted(((v, k) for k, v in final["iou"].items() if v is not None), reverse=True)
    return {"mean_iou": final["mean_iou"], "pixel_accuracy": final["pixel_accuracy"],
            "classes_scored": final["classes_scored"], "train_loss": final["train_loss"],
            "best_classes": {k: v for v, k in ious[:8]}, "seconds": round(seconds, 1),
            "train_seconds": round(final["train_seconds"], 1), "backbone": metrics["backbone"], "command": command}


def compare(encoder: str, data_flags: list[str], schedule: list[str], out: Path) -> dict:
    """BYOL-initialised against random-initialised backbone, same schedule, same seed."""
    return byol_against_random(encoder, lambda spec, o: run_segment(["--encoder", spec, *data_flags, *schedule], o),
                               out, lambda r: f"mIoU {r['mean_iou']:.4f}  pixel accuracy {r['pixel_accuracy']:.4f}")


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
    started = now()
    runs = compare(args.encoder, coco_flags(args.data), schedule, args.out)
    result = {"date": started, "machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    return report_transfer(args.json, result, runs, METRICS)


if __name__ == "__main__":
    sys.exit(main())
