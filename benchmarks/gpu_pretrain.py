"""GPU pretraining benchmarks, one script within ten minutes on one GPU, results as JSON:

  1. ResNet-50 at 224 px (imagenet-resnet50 preset, batch 256, bf16, channels_last):
     a. the step broken down by phase, with MFU (benchmarks/pretrain_speed.py's measurement);
     b. the real trainer on generated 256 px JPEGs decoded into device memory (memory pipeline):
        images/s and data-wait share;
     c. the same JPEGs streamed (stream pipeline: decode and crop in CPU workers, pinned memory,
        non-blocking copies, prefetching): images/s and data-wait share, the number that says
        whether the data path keeps up (aim: data wait under 5% of step time).
  2. CIFAR-10 ResNet-18 (cifar10-resnet18 preset): kNN top-1 against wall-clock (aim: 0.87
     within ten minutes).

    python benchmarks/gpu_pretrain.py --cifar-train ../shared/data/cifar10/train.zip \
        --cifar-test ../shared/data/cifar10/test.zip --json gpu_pretrain.json

Parts 1b, 1c and 2 run the real trainer (`python -m trainer.pretrain`) as a user would. `--tiny`
runs every part in seconds on a CPU for the test suite.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from _common import ROOT, smooth_jpegs, write_json  # puts the repository root on sys.path


def run_trainer(flags: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.pretrain", "--no-progress", *flags], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-train", required=True)
    p.add_argument("--cifar-test", required=True)
    p.add_argument("--resnet50-steps", type=int, default=60)
    p.add_argument("--cifar-budget", default="6m", help="wall-clock training budget for part 2")
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN measurements in part 2")
    p.add_argument("--batch-size", type=int, default=256, help="part 1's batch (the issue asks for >= 256)")
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1),
                   help="decoding workers for part 1's stream pipeline")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks in part 1")
    p.add_argument("--tiny", action="store_true", help="seconds-long CPU configuration (tests)")
    p.add_argument("--json", default="gpu_pretrain.json")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "torch": torch.__version__, "platform": platform.platform()}
    work = Path(tempfile.mkdtemp(prefix="byolkit-gpu-bench-"))

    # -- part 1a: ResNet-50 at 224 px, the step by phase and its MFU ----------------------------------
    import pretrain_speed
    speed_args = ["--preset", "imagenet-resnet50", "--device", device, "--batch-size", str(args.batch_size),
                  "--steps", "30", "--warmup", "5", "--num-images", "1024"]
    if args.compile:
        speed_args.append("--compile")
    if args.tiny:
        speed_args = ["--preset", "imagenet-resnet50", "--device", "cpu", "--batch-size", "4", "--steps", "2",
                      "--warmup", "1", "--num-images", "8", "--precision", "fp32", "--set", "model.arch=resnet18",
                      "--set", "data.image_size=64", "--set", "model.projector_hidden_dim=64",
                      "--set", "model.predictor_hidden_dim=64"]
    speed_json = work / "pretrain_speed.json"
    pretrain_speed.main([*speed_args, "--json", str(speed_json)])
    result["resnet50_224_step"] = json.loads(speed_json.read_text())

    # -- parts 1b and 1c: the real trainer, memory and stream pipelines ------------------------------
    r50 = ["--preset", "imagenet-resnet50", "--batch-size", str(args.batch_size), "--set", "run.log_every=10",
           "--set", "run.checkpoint_every=100000", "--device", device, "--set", f"data.workers={args.workers}"]
    if args.compile:
        r50.append("--compile")
    steps, n_images = args.resnet50_steps, 4096
    if args.tiny:
        r50 = ["--preset", "imagenet-resnet50", "--batch-size", "4", "--arch", "resnet18",
               "--set", "data.image_size=64", "--set", "run.log_every=1", "--set", "model.projector_hidden_dim=64",
               "--set", "model.predictor_hidden_dim=64", "--device", "cpu", "--set", "data.workers=0"]
        steps, n_images = 3, 16
    images = smooth_jpegs(work / "r50-images", n_images, 256 if not args.tiny else 72)
    for pipeline in ("memory", "stream"):
        run = work / f"r50-{pipeline}"
        wall = run_trainer([*r50, "--set", f"data.pipeline={pipeline}", "--data", str(images), "--out", str(run),
                            "--max-steps", str(steps)])
        rows = [r for r in metrics(run) if "images_per_s" in r]
        steady = rows[len(rows) // 3:] or rows  # skip warm-up (cudnn autotuning, allocator growth)
        key = "resnet50_224" if pipeline == "memory" else "resnet50_224_stream"
        result[key] = {
            "pipeline": pipeline, "batch_size": args.batch_size if not args.tiny else 4, "steps": steps,
            "wall_s": wall, "images_per_s": float(np.median([r["images_per_s"] for r in steady])),
            "data_wait_fraction": float(np.median([r["data_wait"] for r in steady]))}
        print(f"resnet50@224 ({pipeline}):", result[key], flush=True)

    # -- part 2: CIFAR-10 ResNet-18, kNN against wall-clock -------------------------------------------
    c10 = ["--preset", "cifar10-resnet18", "--device", device, "--time-budget", args.cifar_budget,
           "--epochs", "200", "--set", f"run.knn_every={args.knn_every}", "--set", "run.log_every=50"]
    if args.tiny:
        c10 = ["--preset", "cifar10-resnet18", "--device", "cpu", "--max-steps", "2", "--batch-size", "8",
               "--set", "model.projector_hidden_dim=64", "--set", "model.predictor_hidden_dim=64",
               "--set", "run.knn_every=1", "--set", "data.workers=0"]
    run = work / "cifar"
    wall = run_trainer([*c10, "--data", args.cifar_train, "--val-data", args.cifar_test, "--out", str(run)])
    rows = metrics(run)
    curve = []
    for r in rows:
        if "knn_top1" in r:
            curve.append({"step": r["step"], "knn_top1": r["knn_top1"], "train_seconds": r.get("train_seconds")})
    summary = json.loads((run / "summary.json").read_text())
    result["cifar10_resnet18"] = {"wall_s": wall, "train_seconds": summary["train_seconds"],
                                  "steps": summary["steps"], "final_knn_top1": summary.get("knn_top1"),
                                  "knn_curve": curve,
                                  "images_per_s": float(np.median([r["images_per_s"] for r in rows
                                                                   if "images_per_s" in r][1:] or [0]))}
    print("cifar10 resnet18:", result["cifar10_resnet18"], flush=True)
    write_json(args.json, result)
    print(f"wrote {args.json} ({time.perf_counter() - t_start:.0f}s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
