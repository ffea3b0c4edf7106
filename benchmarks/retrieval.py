"""Retrieval quality: precision@10 on a labelled gallery, each image querying all the others.

    python benchmarks/retrieval.py --encoder /work/bench/cpu_quick_run \
        --gallery ../shared/data/cifar10/test.zip --json benchmarks/results/retrieval.json

precision@10: the share of an image's 10 nearest other images (cosine similarity, exact search
with the app's index, app/faiss_index.py) that carry its label, averaged over the gallery. Rows:
  * the trained encoder (--encoder: a run directory or encoder.safetensors), through its own
    preprocessing contract;
  * the same architecture at random initialisation (torch.manual_seed(0), as in
    benchmarks/pretrain_cpu_quick.py), through the same contract;
  * normalised pixels at 32 px, for scale.
With --onnx, the trained encoder's gallery is embedded a second time through the exported file
and serving.client.EmbeddingClient (the app's own path), and both figures are reported.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # puts the repository root on sys.path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="trained encoder: run directory or encoder.safetensors")
    p.add_argument("--gallery", required=True, help="labelled images: folder or zip in ImageFolder layout")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--limit", type=int, default=0, help="use only the first N images of each class (0: all)")
    p.add_argument("--onnx", default=None, help="also embed through this exported model (the app's path)")
    p.add_argument("--no-pixels", action="store_true", help="skip the pixel baseline")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from app.retrieval import embed_torch, precision_at_k
    from contract.preprocess import Preprocessing
    from trainer.checkpoint import CheckpointError, load_encoder
    from trainer.data import DataError, open_collection
    from trainer.models import build_encoder
    try:
        trained, info = load_encoder(args.encoder)
        gallery = open_collection(args.gallery)
        if gallery.labels is None:
            raise DataError(f"{args.gallery} has no class folders: precision@k needs labels")
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        gallery = _first_per_class(gallery, args.limit)
    pre = info["preprocessing"]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "gallery": args.gallery,
               "images": len(gallery), "classes": len(gallery.classes), "k": args.k, "encoder": str(args.encoder),
               "arch": info["arch"], "stem": info["stem"], "fingerprint": info["fingerprint"],
               "step": info.get("step"), "preprocessing": pre.to_dict(), "precision_at_k": {}}

    def record(name, vectors, labels, started):
        value = precision_at_k(vectors, labels, args.k)
        results["precision_at_k"][name] = round(value, 4)
        print(f"{name:>14}: precision@{args.k} = {value:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
        return value

    t = time.perf_counter()
    vectors, labels, skipped = embed_torch(trained, gallery, pre)
    results["skipped"] = skipped
    record("byol", vectors, labels, t)
    t = time.perf_counter()
    torch.manual_seed(0)
    random_encoder, _ = build_encoder(info["arch"], info["stem"])
    record("random_init", embed_torch(random_encoder.eval(), gallery, pre)[0], labels, t)
    if not args.no_pixels:
        from trainer.data import decode_all
        t = time.perf_counter()
        pixels = Preprocessing(32, 32, pre.mean, pre.std)
        x, y, _ = decode_all(gallery, pixels, workers=0, progress=False)
        record("pixels_32px", pixels.normalize_tensor(x).flatten(1).numpy(), y.numpy(), t)
    if args.onnx:
        from app.embedding import embed_collection, open_encoder
        t = time.perf_counter()
        encoder = open_encoder(args.onnx)
        done = embed_collection(encoder, gallery, progress=False)
        names = {c: i for i, c in enumerate(gallery.classes)}
        record("byol_onnx", done.vectors, np.array([names[it["label"]] for it in done.items]), t)
        results["onnx"] = {"path": args.onnx, "fingerprint": encoder.model["fingerprint"]}
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


def _first_per_class(collection, n: int):
    """A view of `collection` with at most n images of each class (the first ones)."""
    counts, keep = {}, []
    for i, y in enumerate(collection.labels):
        if counts.get(y, 0) < n:
            counts[y] = counts.get(y, 0) + 1
            keep.append(i)
    return _Subset(collection, keep)


class _Subset:
    def __init__(self, base, indices):
        self.base, self.indices = base, indices
        self.labels = [base.labels[i] for i in indices]
        self.classes, self.description = base.classes, base.description

    def __len__(self):
        return len(self.indices)

    def load(self, i):
        return self.base.load(self.indices[i])

    def name(self, i):
        return self.base.name(self.indices[i])


if __name__ == "__main__":
    sys.exit(main())
