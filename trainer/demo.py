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

from .runtime import cli_main
from .synthetic import SHAPES
from .synthetic import write_shape_classes as generate


@cli_main(errors=(ValueError,))
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
    from .pretrain import parse_duration, run
    try:
        budget = parse_duration(args.time_budget)
    except argparse.ArgumentTypeError as e:
        p.error(f"--time-budget: {e}")

    out = Path(args.out)
    data_root = out.parent / f"{out.name}-images"
    train_dir = generate(data_root / "train", args.per_class, seed=0)
    val_dir = generate(data_root / "val", max(20, args.per_class // 5), seed=1)
    print(f"demo images: {train_dir} and {val_dir} ({len(SHAPES)} shapes)", file=sys.stderr)

    summary = run(out, str(train_dir), preset="cpu-quick", overrides=["data.workers=0"], val_data=str(val_dir),
                  resume=(out / "checkpoint.pt").exists(), time_budget=budget, epochs=1000)
    print(json.dumps(summary))

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
