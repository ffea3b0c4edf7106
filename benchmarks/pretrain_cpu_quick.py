"""The cpu-quick benchmark: what ten minutes of BYOL on this CPU buy, against two baselines.

    python benchmarks/pretrain_cpu_quick.py --train ../shared/data/cifar10/train.zip \
        --test ../shared/data/cifar10/test.zip --budget 10m --json benchmarks/results/cpu_quick.json

Weighted kNN top-1/top-5 (k=200, T=0.1, cosine; train split as memory, test split as queries) for
  (a) raw pixels at 32 px, normalised by the data set's mean and std,
  (b) the preset's encoder at random initialisation,
  (c) the same encoder after BYOL for the time budget (trainer.pretrain --time-budget),
plus the training images/s. Decoding and evaluation are timed apart from the training budget.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, write_json  # puts the repository root on sys.path

from contract.preprocess import Preprocessing
from trainer.checkpoint import load_encoder
from trainer.config import preset
from trainer.data import decode_all, open_collection
from trainer.knn import embed, knn_accuracy
from trainer.models import build_encoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="labelled training images (folder or zip)")
    p.add_argument("--test", required=True, help="labelled test images (folder or zip)")
    p.add_argument("--preset", default="cpu-quick")
    p.add_argument("--budget", default="10m", help="training wall-clock budget")
    p.add_argument("--out", default="benchmarks/results/cpu_quick_run", help="run directory (replaced)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--set", action="append", default=[], help="extra trainer overrides")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    pre = cfg.data.preprocessing()
    device = torch.device("cpu")
    train_set, test_set = open_collection(args.train), open_collection(args.test)
    num_classes = len(train_set.classes)
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine(), "preset": args.preset,
                     "budget": args.budget, "train_images": len(train_set), "test_images": len(test_set)}

    def knn(train_features, test_features, y_train, y_test):
        return knn_accuracy(train_features, y_train, test_features, y_test, num_classes)

    # (a) normalised pixels at the data's native 32 px
    pixels = Preprocessing(32, 32, pre.mean, pre.std)
    xtr, ytr, _ = decode_all(train_set, pixels, args.workers, progress=False)
    xte, yte, _ = decode_all(test_set, pixels, args.workers, progress=False)
    results["pixels_32px"] = knn(pixels.normalize_tensor(xtr).flatten(1), pixels.normalize_tensor(xte).flatten(1),
                                 ytr, yte)
    print("pixels", results["pixels_32px"], flush=True)

    # (b) the encoder at random initialisation, through the preset's own preprocessing contract
    xtr, ytr, _ = decode_all(train_set, pre, args.workers, progress=False)
    xte, yte, _ = decode_all(test_set, pre, args.workers, progress=False)
    torch.manual_seed(0)
    random_encoder, _ = build_encoder(cfg.model.arch, cfg.model.stem)
    random_encoder = random_encoder.to(memory_format=torch.channels_last)
    results["random_init"] = knn(embed(random_encoder, xtr, pre, device, precision="bf16"),
                                 embed(random_encoder, xte, pre, device, precision="bf16"), ytr, yte)
    print("random init", results["random_init"], flush=True)

    # (c) BYOL for the budget, in its own process as a user would run it
    out = Path(args.out)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "trainer.pretrain", "--preset", args.preset, "--data", args.train,
           "--out", str(out), "--time-budget", args.budget, "--no-progress", "--epochs", "1000",
           "--set", f"data.workers={args.workers}"] + [f"--set={s}" for s in args.set]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results["pretrain_wall_s"] = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # the first window holds warm-up
    results["train"] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
                        "images_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
                        "images_seen": summary["steps"] * cfg.optim.batch_size, "final_loss": summary["loss"]}
    encoder, _ = load_encoder(out)
    encoder = encoder.to(memory_format=torch.channels_last)
    results["byol"] = knn(embed(encoder, xtr, pre, device, precision="bf16"),
                          embed(encoder, xte, pre, device, precision="bf16"), ytr, yte)
    results["config"] = json.loads((out / "config.json").read_text())
    print("BYOL", results["byol"], results["train"], flush=True)
    print(json.dumps({k: results[k] for k in ("pixels_32px", "random_init", "byol", "train")}, indent=2))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
