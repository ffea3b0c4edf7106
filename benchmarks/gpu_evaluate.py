"""The full evaluation protocols on a GPU: kNN and 100-epoch linear evaluation with augmentation.

    PYTHONPATH=. python benchmarks/gpu_evaluate.py --encoder runs/cifar10-resnet18 \
        --train cifar10/train.zip --test cifar10/test.zip --out gpu_evaluate.json

For a CIFAR-10 ResNet-18 encoder (e.g. from the cifar10-resnet18 preset) this is the paper's
linear protocol: frozen encoder, linear classifier, SGD + Nesterov, cross-entropy, cosine LR,
random resized crop + flip for training, the contract's centre crop for testing, 100 epochs,
bf16 autocast. Both protocols run through `python -m trainer.evaluate` (metrics also land in the
encoder's eval/ folder); this script gathers them with timings and the device name into one JSON.
The linear run checkpoints every epoch; rerunning this script after an interruption resumes it.

`--tiny` runs the same code on the CPU with 2 epochs (the test suite does, on generated images).
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

from trainer.checkpoint import atomic_write
from trainer.evaluate import get_args_parser, run, summary_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="run directory, checkpoint.pt or encoder.safetensors")
    p.add_argument("--train", required=True, help="labelled training images (e.g. cifar10 train.zip)")
    p.add_argument("--test", required=True, help="labelled test images")
    p.add_argument("--out", type=Path, required=True, help="JSON with both protocols' results")
    p.add_argument("--epochs", type=int, default=100, help="linear evaluation epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 epochs, batch 16")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device; use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    epochs, batch = (2, 16) if args.tiny else (args.epochs, args.batch_size)
    common = ["--encoder", args.encoder, "--train", args.train, "--test", args.test, "--device", device,
              "--workers", str(args.workers)]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": args.tiny}
    parser = get_args_parser()
    for name, extra in (("knn", []),
                        ("linear", ["--epochs", str(epochs), "--batch-size", str(batch), "--lr", str(args.lr),
                                    "--resume"])):
        t0 = time.perf_counter()
        record = run(parser.parse_args([name, *common, *extra]))
        record["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = record
        print(summary_line(record))
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
