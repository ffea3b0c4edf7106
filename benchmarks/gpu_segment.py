"""Segmentation transfer on coco256 with a GPU schedule: BYOL encoder against random initialisation.

    python benchmarks/gpu_segment.py --data ../shared/data/coco256 --encoder runs/cifar10-resnet18 \\
        --out /tmp/gpu_segment --json gpu_segment.json

The same comparison as benchmarks/segment_coco.py (the real `python -m trainer.segment`, only
--encoder differs), with torchvision's own segmentation recipe scaled to 100 photos: DeepLabV3,
base size 520, crop 480, batch 8, 30 epochs, lr 0.02 (about 5-8 minutes per run on one modern GPU
for a ResNet-50 encoder). Each run uses one GPU; `torchrun --nproc_per_node N -m trainer.segment`
with the commands recorded in the JSON spreads one run over N.

`--tiny` runs the whole script in seconds on a CPU for the test suite: generated shapes on noise
instead of coco256, a narrow ResNet-18 at 56 px, one epoch; an untrained saved encoder file stands
in for the BYOL one (the point is the plumbing, not the number).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_transfer, transfer_parser
from segment_coco import METRICS, coco_flags, compare


def make_shapes(root: Path, count: int, seed: int, size=(64, 56)) -> list[str]:
    """Reddish squares and bluish discs on noise, with masks of class ids 10 (background), 20, 30."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        photo = rng.integers(60, 160, size=(h, w, 3)).astype(np.int16)
        mask = np.full((h, w), 10, np.uint8)
        x0, y0, s = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20)), int(rng.integers(10, 20))
        square = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
        cx, cy, r = int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8)), int(rng.integers(5, 8))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        photo[square] += np.array([80, -40, -40], np.int16)
        photo[disc] += np.array([-40, -30, 80], np.int16)
        mask[square], mask[disc] = 20, 30
        Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(images / f"{i:03d}.png")
        Image.fromarray(mask).save(masks / f"{i:03d}.png")
    return [str(images), str(masks)]


def tiny_data(root: Path) -> tuple[list[str], str]:
    from trainer.checkpoint import save_encoder
    from trainer.models import build_encoder
    from trainer.sources import default_preprocessing
    train, val = make_shapes(root / "train", 16, 1), make_shapes(root / "val", 4, 2)
    classes = root / "classes.json"
    classes.write_text(json.dumps({"ignore_index": 0, "classes": {"10": "background", "20": "square", "30": "disc"}}))
    encoder, dim = build_encoder("resnet18_w16", "imagenet")
    save_encoder(root / "encoder.safetensors", encoder, arch="resnet18_w16", stem="imagenet", embedding_dim=dim,
                 preprocessing=default_preprocessing("imagenet", 56))
    flags = ["--train-images", train[0], "--train-masks", train[1], "--val-images", val[0], "--val-masks", val[1],
             "--classes", str(classes)]
    return flags, str(root / "encoder.safetensors")


def main(argv=None) -> int:
    p = transfer_parser(__doc__)
    p.add_argument("--data", type=Path, help="the coco256 folder (not needed with --tiny)")
    p.add_argument("--encoder", help="the BYOL encoder (run directory or file; not needed with --tiny)")
    p.add_argument("--head", default="deeplabv3")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--base-size", type=int, default=520)
    p.add_argument("--crop-size", type=int, default=480)
    args = p.parse_args(argv)
    tiny = (tiny_data, ["--head", "fcn", "--epochs", "1", "--batch-size", "8", "--base-size", "56",
                        "--crop-size", "48", "--workers", "0", "--device", "cpu", "--draw", "1"])

    def setup() -> tuple[list[str], str, list[str]]:
        if not (args.data and args.encoder):
            p.error("--data and --encoder are required (or --tiny)")
        return coco_flags(args.data), args.encoder, [
            "--head", args.head, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr",
            str(args.lr), "--base-size", str(args.base_size), "--crop-size", str(args.crop_size), "--workers",
            str(args.workers), "--eval-every", "5", "--device", "cuda"]
    return run_transfer(args, tiny, setup, compare, METRICS)


if __name__ == "__main__":
    sys.exit(main())
