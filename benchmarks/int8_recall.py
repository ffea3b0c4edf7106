"""int8 against float32 on a real gallery: recall@10 of the int8 neighbours, per calibration method.

    python benchmarks/int8_recall.py --model runs/c10.onnx --calibration ../shared/data/cifar10/train.zip \\
        --gallery ../shared/data/cifar10/test.zip --json benchmarks/results/int8_recall.json

For each calibration method (MinMax, Entropy, Percentile) the float32 export --model is quantised by
export.quantize (its own guard, on images held back from --calibration, is recorded but does not
refuse: --min-recall 0), then every image of --gallery is embedded by both models, and each gallery
image's ten nearest other gallery images are compared: recall@10 of the int8 neighbours against the
float32 ones, and the cosine between each image's two embeddings. Also recorded: file sizes, the
time to quantise, and images/s of both models over the gallery at batch 32 (the same images, the two
sessions alternating batch by batch so that a background load hits both alike).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, machine, onnxruntime_info  # puts the repository root on sys.path

import export.quantize as xq
from contract.deployment import OUTPUT, read_onnx_metadata


def embed_both(float_path, int8_path, pixels, batch: int = 32):
    """-> (float32 embeddings, int8 embeddings, {"float32": images/s, "int8": images/s})."""
    sessions = {"float32": xq._session(float_path), "int8": xq._session(int8_path)}
    name = sessions["float32"].get_inputs()[0].name
    for s in sessions.values():
        s.run([OUTPUT], {name: pixels[:batch]})  # warm-up
    out, seconds = {k: [] for k in sessions}, dict.fromkeys(sessions, 0.0)
    for i in range(0, len(pixels), batch):
        for key, s in sessions.items():
            t = time.perf_counter()
            out[key].append(s.run([OUTPUT], {name: pixels[i:i + batch]})[0])
            seconds[key] += time.perf_counter() - t
    speed = {k: round(len(pixels) / v, 1) for k, v in seconds.items()}
    return np.concatenate(out["float32"]), np.concatenate(out["int8"]), speed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a float32 uint8-input export (export.onnx)")
    p.add_argument("--calibration", required=True, help="calibration images (folder, zip, data set name)")
    p.add_argument("--gallery", required=True, help="the gallery (folder, zip, data set name)")
    p.add_argument("--gallery-count", type=int, default=0, help="use the first N gallery images (0: all)")
    p.add_argument("--methods", default=",".join(xq.CALIBRATION_METHODS))
    p.add_argument("--calibration-images", type=int, default=xq.DEFAULT_CALIBRATION_IMAGES)
    p.add_argument("--held-back", type=int, default=xq.DEFAULT_HELD_BACK)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    from trainer.data import open_collection

    started = datetime.datetime.now().astimezone()
    meta = read_onnx_metadata(args.model)
    gallery = open_collection(args.gallery)
    n = args.gallery_count or len(gallery)
    print(f"decoding {n} gallery images", file=sys.stderr, flush=True)
    pixels = xq.load_pixels(gallery, range(n), meta["preprocessing"])
    result = {"date": started.isoformat(timespec="seconds"), "machine": machine(**onnxruntime_info()),
              "command": " ".join(sys.argv),
              "model": {"path": args.model, "arch": meta["arch"], "stem": meta["stem"],
                        "input_size": meta["preprocessing"].input_size, "fingerprint": meta["fingerprint"]},
              "gallery": {"source": args.gallery, "images": len(pixels)}, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="byolkit-int8-") as tmp:
        for method in args.methods.split(","):
            out = Path(tmp) / f"{method}.onnx"
            print(f"{method}: quantising", file=sys.stderr, flush=True)
            report = xq.export_int8(args.model, out, args.calibration, method=method, min_recall=0,
                                    calibration_images=args.calibration_images, held_back=args.held_back)
            f_emb, q_emb, speed = embed_both(args.model, out, pixels)
            figures = xq.agreement(f_emb, q_emb)
            result["methods"][method] = {"gallery": figures, "guard": report["guard"],
                                         "size_mb": {"float32": round(report["float_size_bytes"] / 1e6, 3),
                                                     "int8": round(report["size_bytes"] / 1e6, 3)},
                                         "size_ratio": report["size_ratio"],
                                         "quantize_s": report["seconds"]["quantize"],
                                         "images_per_s_batch32": speed,
                                         "int8_over_float32": round(speed["int8"] / speed["float32"], 2)}
            print(f"{method}: gallery recall@10 {figures['recall_at_10']}, cosine mean {figures['cosine_mean']} "
                  f"min {figures['cosine_min']}; guard recall@10 {report['guard']['recall_at_10']}; "
                  f"images/s {speed}", file=sys.stderr, flush=True)
    result["seconds"] = round((datetime.datetime.now().astimezone() - started).total_seconds(), 1)
    return emit_json(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
