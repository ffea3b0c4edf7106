"""The photos preset's design runs: what the main job's budget of BYOL buys on the shipped flowers.

    python benchmarks/photos_preset.py --source ../shared/data/flowers-demo --preset cpu-photos \
        --budget 3m --json benchmarks/results/photos/cpu-photos.json [--set data.image_size=64 ...]

The photos are split as app.sampleset ships them (200 per kind in the package, the rest held
out), written at the size the configuration decodes to. Then, as the main job trains
(trainer.pretrain in its own process, --time-budget, decoding without workers), BYOL runs for the
budget on the shipped photos, and precision@10 is measured for
  * byol: the trained encoder; random_init: the same network at torch.manual_seed(0);
  * pixels: the images through the same preprocessing contract, normalised and flattened;
each on the shipped gallery (every photo querying the others: the main job's own figure) and
with the held-out photos as queries against the shipped gallery.
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
from _common import ROOT, machine, write_json  # puts the repository root on sys.path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the flowers-demo folder")
    p.add_argument("--preset", default="cpu-photos")
    p.add_argument("--budget", default="3m", help="training wall-clock budget (default %(default)s)")
    p.add_argument("--set", action="append", default=[], help="trainer overrides, e.g. data.image_size=64")
    p.add_argument("--work", default="benchmarks/results/photos", help="data and run folders (default %(default)s)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch

    from app.retrieval import embed_torch, pixel_vectors, precision_at_k
    from app.sampleset import split, write_zip
    from trainer.checkpoint import load_encoder
    from trainer.config import apply_override, preset
    from trainer.data import open_collection
    from trainer.models import build_encoder

    cfg = preset(args.preset)
    for s in args.set:
        apply_override(cfg, s)
    pre = cfg.data.preprocessing()
    work = Path(args.work)
    data = work / f"data_{pre.resize_size}px"
    shipped_zip, held_zip = data / "shipped.zip", data / "held_out.zip"
    if not held_zip.is_file():
        shipped, _, held_out = split(Path(args.source))
        write_zip(Path(args.source), shipped, shipped_zip, pre.resize_size)
        write_zip(Path(args.source), held_out, held_zip, pre.resize_size)
    gallery, queries = open_collection(str(shipped_zip)), open_collection(str(held_zip))
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "preset": args.preset,
               "overrides": args.set, "budget": args.budget, "gallery": len(gallery), "queries": len(queries)}

    out = work / ("run_" + "_".join([args.preset, *[s.replace("=", "-") for s in args.set]]))
    if out.exists():
        shutil.rmtree(out)
    batch = cfg.optim.batch_size
    cmd = [sys.executable, "-m", "trainer.pretrain", "--preset", args.preset, "--data", str(shipped_zip),
           "--out", str(out), "--time-budget", args.budget, "--epochs", "10000", "--no-progress",
           "--set", "data.workers=0", *[f"--set={s}" for s in args.set]]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results["pretrain_wall_s"] = round(time.perf_counter() - t0, 1)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    results["train"] = {"steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 1),
                        "epochs": round(summary["steps"] * batch / len(gallery), 1),
                        "images_per_s_median": round(sorted(speeds)[len(speeds) // 2]) if speeds else None,
                        "final_loss": summary["loss"]}

    trained, info = load_encoder(out)
    torch.manual_seed(0)
    random_encoder, _ = build_encoder(info["arch"], info["stem"])
    scores = {}
    for name, enc in (("byol", trained), ("random_init", random_encoder.eval())):
        g, gl, _ = embed_torch(enc, gallery, pre)
        q, ql, _ = embed_torch(enc, queries, pre)
        scores[name] = (precision_at_k(g, gl), precision_at_k(g, gl, queries=q, query_labels=ql))
    g, gl = pixel_vectors(gallery, pre)
    q, ql = pixel_vectors(queries, pre)
    scores["pixels"] = (precision_at_k(g, gl), precision_at_k(g, gl, queries=q, query_labels=ql))
    results["precision_at_10"] = {k: round(v[0], 4) for k, v in scores.items()}
    results["precision_at_10_held_out"] = {k: round(v[1], 4) for k, v in scores.items()}
    results["config"] = json.loads((out / "config.json").read_text())
    t = results["train"]
    print(f"| {' '.join(args.set) or '(preset)'} | {t['steps']} ({t['epochs']}) | {t['images_per_s_median']} | "
          + " | ".join(f"{scores[k][0]:.3f} / {scores[k][1]:.3f}" for k in ("byol", "random_init", "pixels"))
          + " |", flush=True)
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
