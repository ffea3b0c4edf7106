"""Transfer to detection on coco256: a BYOL-initialised backbone against a randomly initialised one.

    /work/bench/quiet-run /work/main/.venv/bin/python benchmarks/downstream_coco.py \\
        --encoder /work/bench/downstream/byol_coco64 --coco /work/shared/data/coco256 \\
        --out /work/bench/downstream/coco --json /work/bench/downstream/downstream_coco.json

Each task is one function that fine-tunes twice under the same schedule, once from --encoder and
once from `random:<encoder>` (same architecture, stem and normalisation, fresh weights, same seed
for everything else), train2017 -> val2017, and returns both runs' metrics and wall-clock times:
  detection: `python -m trainer.detect` (Faster R-CNN, ResNet-FPN; COCO mAP@[.5:.95], AP50, AP75).
Segmentation (`trainer.segment`, mIoU) has its own script, benchmarks/segment_coco.py.

The schedule is a short CPU one (a few minutes a run at the default 6 epochs; --epochs for a
longer one): full fine-tuning (all stages, BatchNorm trained) for both backbones, so the only
difference is the initial weights.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit_json, machine  # puts the repository root on sys.path

# full fine-tuning on both sides; sized for ~3-4 minutes a run on two CPU cores at 224 px; LR 0.02 x 4/16
# (the linear scaling rule from the references' batch 16: 0.02 itself diverged at step 37)
CPU_DETECTION_SCHEDULE = ["--epochs", "6", "--batch-size", "4", "--lr", "0.005", "--warmup-steps", "50",
                          "--min-size", "224", "--max-size", "320", "--anchor-sizes", "16,32,64,128,256",
                          "--fpn-channels", "128", "--head-size", "256", "--rois-per-image", "128",
                          "--trainable-layers", "5", "--norm", "bn", "--device", "cpu", "--workers", "1"]


def run_module(module: str, argv: list[str], log: Path, launcher: list[str] | None = None) -> tuple[dict, float]:
    """Run `python -m module argv` (its output to `log`) -> (last JSON line it printed, wall seconds).

    launcher: e.g. ["torch.distributed.run", "--nproc_per_node=8"] to start it through torchrun."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", *launcher, "-m", module] if launcher else [sys.executable, "-m", module]
    with open(log, "w") as f:
        proc = subprocess.run([*cmd, *argv], stdout=subprocess.PIPE, stderr=f, text=True,
                              env=env, cwd=ROOT, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def detection(encoder: str, coco: Path, out: Path, schedule: list[str], draw: int = 4,
              launcher: list[str] | None = None) -> dict:
    """Faster R-CNN from `encoder` and from random:`encoder`, same schedule; COCO box metrics of each."""
    data = ["--train-images", str(coco / "images/train2017"),
            "--train-ann", str(coco / "annotations/instances_train2017.json"),
            "--val-images", str(coco / "images/val2017"),
            "--val-ann", str(coco / "annotations/instances_val2017.json")]
    result = {"schedule": " ".join(schedule)}
    for name, source in (("byol", encoder), ("random", f"random:{encoder}")):
        run_dir = out / f"detect_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        summary, seconds = run_module("trainer.detect", ["--encoder", source, *data, "--out", str(run_dir),
                                                         "--no-progress", "--draw", str(draw), *schedule],
                                      out / f"detect_{name}.log", launcher)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result[name] = {"encoder": source, "mAP": summary["bbox_mAP"], "AP50": summary["bbox_AP50"],
                        "AP75": summary["bbox_AP75"], "wall_seconds": round(seconds, 1),
                        "epoch_losses": [e["loss"] for e in metrics["epochs"]],
                        "fingerprint": metrics["encoder"]["fingerprint"], "run_dir": str(run_dir)}
        print(f"detection {name}: mAP {summary['bbox_mAP']:.4f} AP50 {summary['bbox_AP50']:.4f} "
              f"({seconds:.0f} s)", file=sys.stderr)
    return result


def with_epochs(schedule: list[str], epochs: int | None) -> list[str]:
    """The schedule with its --epochs replaced (the LR milestones are fractions of the run)."""
    if epochs is None:
        return schedule
    i = schedule.index("--epochs")
    return [*schedule[:i + 1], str(epochs), *schedule[i + 2:]]


TASKS = {"detection": lambda args: detection(args.encoder, Path(args.coco), Path(args.out),
                                             with_epochs(CPU_DETECTION_SCHEDULE, args.epochs))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="the BYOL encoder (run dir, checkpoint.pt or encoder.safetensors)")
    p.add_argument("--coco", required=True, help="the coco256 folder (images/, annotations/)")
    p.add_argument("--out", required=True, help="scratch folder for the runs (replaced)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--epochs", type=int, help="training epochs of every task (default: the CPU schedule's 6)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    args = p.parse_args(argv)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "machine": machine(), "encoder": args.encoder, "command": " ".join(sys.argv)}
    for task in args.tasks.split(","):
        if task not in TASKS:
            p.error(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        results[task] = TASKS[task](args)
    return emit_json(args.json, results)


if __name__ == "__main__":
    sys.exit(main())
