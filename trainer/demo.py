"""The out-of-the-box run: BYOL on a generated image set, so a new user sees it learn.

    python -m trainer.demo --out runs/demo [--time-budget 3m]

The images are drawn here, deterministically, so nothing is downloaded and no licence
applies: 32 px pictures of six shapes (circle, square, triangle, cross, ring, bar) in random
colours, sizes and positions over noisy, randomly tinted backgrounds. Class folders hold the
shape names; BYOL never sees them, they only score the result: weighted kNN top-1 of the
encoder at random initialisation against the same encoder after BYOL.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def draw_shape(rng: np.random.Generator, shape: str, size: int = 32) -> Image.Image:
    """One picture: a noisy tinted background with one shape of random colour, scale and place."""
    tint = rng.uniform(0, 255, 3)
    background = np.clip(tint + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    color = tuple(int(c) for c in rng.uniform(0, 255, 3))
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=color)
    return image


def generate(root: Path, per_class: int, seed: int) -> Path:
    """Write root/<shape>/<n>.png unless it is already complete."""
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(rng, shape).save(root / shape / f"{i:04d}.png")
    marker.write_text("ok\n")
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (the generated images go beside it)")
    p.add_argument("--time-budget", default="3m", help="training time (e.g. 90s, 3m)")
    p.add_argument("--per-class", type=int, default=500, help="training images per shape")
    args = p.parse_args(argv)

    import torch

    from .checkpoint import load_encoder
    from .data import decode_all, open_collection
    from .knn import embed, knn_accuracy
    from .models import build_encoder
    from .pretrain import main as pretrain_main

    out = Path(args.out)
    data_root = out.parent / f"{out.name}-images"
    train_dir = generate(data_root / "train", args.per_class, seed=0)
    val_dir = generate(data_root / "val", max(20, args.per_class // 5), seed=1)
    print(f"demo images: {train_dir} and {val_dir} ({len(SHAPES)} shapes)", file=sys.stderr)

    flags = ["--preset", "cpu-quick", "--data", str(train_dir), "--val-data", str(val_dir), "--out", str(out),
             "--time-budget", args.time_budget, "--epochs", "1000", "--set", "data.workers=0"]
    if (out / "checkpoint.pt").exists():
        flags.append("--resume")
    code = pretrain_main(flags)
    if code:
        return code

    # The same kNN protocol on a randomly initialised copy of the architecture: the baseline.
    trained, info = load_encoder(out)
    pre = info["preprocessing"]
    random_encoder, _ = build_encoder(info["arch"], info["stem"])
    train_set, val_set = open_collection(str(train_dir)), open_collection(str(val_dir))
    xtr, ytr, _ = decode_all(train_set, pre, workers=0, progress=False)
    xva, yva, _ = decode_all(val_set, pre, workers=0, progress=False)
    cpu = torch.device("cpu")
    results = {}
    for name, enc in (("random init", random_encoder.eval()), ("BYOL", trained)):
        results[name] = knn_accuracy(embed(enc, xtr, pre, cpu), ytr, embed(enc, xva, pre, cpu), yva,
                                     len(SHAPES))["top1"]
    print(json.dumps({"knn_top1": results}))
    print(f"\nkNN top-1 on held-out shapes: random init {results['random init']:.3f} -> "
          f"BYOL {results['BYOL']:.3f}\nencoder: {out / 'encoder.safetensors'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
