"""BYOL encoder vs the same network at random initialisation on CIFAR-10, by every CPU-sized protocol.

    /work/bench/quiet-run env PYTHONPATH=. /work/main/.venv/bin/python benchmarks/evaluate_cifar.py \
        --encoder /work/bench/cpu_quick_run --train /work/shared/data/cifar10/train.zip \
        --test /work/shared/data/cifar10/test.zip --out /work/bench/eval/cifar.json

For the trained encoder and for `random:<encoder>` (same architecture and preprocessing, fresh
seeded weights) it measures, with trainer.evaluate's functions and one schedule for both sides:
  * kNN (k=200, T=0.1, cosine) of the 10k test images among the 50k training images;
  * linear evaluation, fast mode (cached features, --linear-epochs);
  * semi-supervised 10%: fine-tuning encoder + head on the same class-balanced 10% subset
    (--semi-epochs), i.e. BYOL initialisation vs training the same network from scratch.
The images are decoded once (the encoder's contract: 32 -> 24 px for the cpu-quick encoder) and
shared by all measurements. Writes JSON and prints a Markdown table.
Defaults (50 fine-tuning epochs on the 5,000 labelled images) take about 6 minutes on the idle
2-core CPU box. `--tiny N` keeps N images per class
(smoke test).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: F401 - puts the repository root on sys.path

from trainer import checkpoint as ckpt_io
from trainer import sources
from trainer.evaluate import (
    Classifier,
    Schedule,
    Split,
    SubsetCollection,
    balanced_subset,
    decode_split,
    linear_eval_features,
    num_classes_of,
    open_labelled,
    train_classifier,
)
from trainer.knn import embed, knn_accuracy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--semi-epochs", type=int, default=50)
    p.add_argument("--semi-lr", type=float, default=0.05)
    p.add_argument("--semi-batch", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--crop-scale-min", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tiny", type=int, default=0, help="keep this many images per class (smoke test)")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    t_start = time.perf_counter()

    _, ref_info = sources.open_encoder(args.encoder)
    pre = ref_info["preprocessing"]
    train_c, test_c, remap = open_labelled(args.train, args.test)
    num_classes = num_classes_of(train_c)
    if args.tiny:
        train_c = SubsetCollection(train_c, balanced_subset(train_c.labels,
                                                            min(1.0, args.tiny / len(train_c) * num_classes), 0))
        test_c = SubsetCollection(test_c, balanced_subset(test_c.labels,
                                                          min(1.0, args.tiny / len(test_c) * num_classes), 0))
    t0 = time.perf_counter()
    train = decode_split(train_c, pre, args.workers, True, "decoding train", None)
    test = decode_split(test_c, pre, args.workers, True, "decoding test", remap)
    decode_s = time.perf_counter() - t0
    print(f"decoded {len(train.images)} train / {len(test.images)} test images at {pre.input_size} px "
          f"in {decode_s:.0f}s", file=sys.stderr)
    subset = balanced_subset(train.labels.tolist(), args.fraction, args.seed)
    labelled = Split(train.images[subset], train.labels[subset], 0)

    linear_sched = Schedule(epochs=args.linear_epochs, batch_size=256, lr=0.1)
    semi_sched = Schedule(epochs=args.semi_epochs, batch_size=args.semi_batch, lr=args.semi_lr,
                          weight_decay=args.weight_decay)
    results = {"encoder": args.encoder, "train": args.train, "test": args.test, "num_train": len(train.images),
               "num_test": len(test.images), "input_size": pre.input_size, "fraction": args.fraction,
               "num_labelled": len(subset), "linear_schedule": linear_sched.to_dict(),
               "semi_schedule": semi_sched.to_dict(), "crop_scale_min": args.crop_scale_min,
               "decode_seconds": round(decode_s, 1), "torch_threads": torch.get_num_threads(), "rows": {}}
    for name, spec in (("BYOL", args.encoder), ("random init", f"random:{args.encoder}")):
        encoder, info = sources.open_encoder(spec, seed=args.seed)
        encoder = encoder.to(memory_format=torch.channels_last)
        row = {"fingerprint": info["fingerprint"]}
        t0 = time.perf_counter()
        bank = embed(encoder, train.images, pre, device, progress=True, desc=f"{name}: embedding train")
        queries = embed(encoder, test.images, pre, device, progress=True, desc=f"{name}: embedding test")
        row["embed_seconds"] = round(time.perf_counter() - t0, 1)
        row["knn"] = knn_accuracy(bank, train.labels, queries, test.labels, num_classes)
        t0 = time.perf_counter()
        row["linear_fast"] = linear_eval_features(bank, train.labels, queries, test.labels, num_classes,
                                                  linear_sched, args.seed, progress=True)
        row["linear_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = Classifier(encoder, info["embedding_dim"], num_classes, frozen=False)
        row["semi"] = train_classifier(model, labelled, test, pre, semi_sched, device=device,
                                       crop_scale_min=args.crop_scale_min, seed=args.seed, progress=True,
                                       desc=f"{name}: fine-tuning on {args.fraction:g}")
        row["semi_seconds"] = round(time.perf_counter() - t0, 1)
        results["rows"][name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ckpt_io.atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))

    frac = f"{args.fraction * 100:g}%"
    print(f"| encoder | kNN top-1 | kNN top-5 | linear (fast) top-1 | linear (fast) top-5 | semi {frac} top-1 "
          f"| semi {frac} top-5 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["rows"].items():
        print(f"| {name} | {r['knn']['top1']:.1%} | {r['knn']['top5']:.1%} | {r['linear_fast']['top1']:.1%} | "
              f"{r['linear_fast']['top5']:.1%} | {r['semi']['top1']:.1%} | {r['semi']['top5']:.1%} |")
    print(f"total {results['seconds']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
