"""The main job: images in, a similar-image search page out, with no data of your own needed.

    python -m app                          # the image set shipped with byolkit (app/data/shapes.zip)
    python -m app --images ~/Pictures      # your own pictures (a folder or a zip archive)

Steps, each skipped when its result is already there (a second run starts in seconds):
  1. train a small BYOL encoder on the images (trainer.pretrain, preset cpu-quick, --train-time);
  2. export it to ONNX (export.onnx), the file the index and the app embed with;
  3. build the index of the images, or add the ones that are new since the last run;
  4. open the app (app.ui) on http://HOST:PORT.
Everything goes to --work (default runs/quickstart/<name of the images>).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

from .sampleset import SAMPLE_ZIP, example_files

MIN_TRAIN_IMAGES = 16


class QuickstartError(ValueError):
    """The main job cannot go on: too few images, a failed training or export."""


def _log(msg: str) -> None:
    print(f"[byolkit] {msg}", file=sys.stderr, flush=True)


def work_dir_for(images: Path, root: Path) -> Path:
    """runs/quickstart/<name>-<hash of the absolute path>: one work folder per image collection."""
    resolved = str(Path(images).expanduser().resolve())
    if Path(resolved) == SAMPLE_ZIP:
        return root / "shapes"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(resolved).stem).strip("-") or "images"
    return root / f"{slug}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def train(images: Path, run: Path, time_budget: str, retrain: bool, n_images: int, steps: int = 0) -> Path:
    """A trained encoder in `run` (reused when its training finished before)."""
    from trainer.pretrain import main as pretrain_main
    encoder_file = run / "encoder.safetensors"
    if (run / "summary.json").is_file() and encoder_file.is_file() and not retrain:
        _log(f"reusing the encoder trained before: {encoder_file} (--retrain trains a new one)")
        return encoder_file
    if retrain and run.exists():
        import shutil
        shutil.rmtree(run)
    if n_images < MIN_TRAIN_IMAGES:
        raise QuickstartError(f"{images} holds {n_images} readable images; training needs at least "
                              f"{MIN_TRAIN_IMAGES} (or give an exported encoder with --model)")
    batch = min(128, 2 ** (n_images.bit_length() - 1))  # cpu-quick's 128, or what a small folder allows
    length = ["--max-steps", str(steps)] if steps else ["--time-budget", time_budget]
    flags = ["--preset", "cpu-quick", "--data", str(images), "--out", str(run), *length, "--epochs", "10000",
             "--batch-size", str(batch), "--no-progress", "--set", "data.workers=0"]
    if (run / "checkpoint.pt").is_file():
        flags.append("--resume")  # an interrupted training continues
    _log(f"training a BYOL encoder on {n_images} images for {f'{steps} steps' if steps else time_budget} "
         f"(cpu-quick preset, batch {batch})")
    code = pretrain_main(flags)
    if code or not encoder_file.is_file():
        raise QuickstartError(f"training failed (exit status {code}); see the messages above")
    return encoder_file


def export(encoder_file: Path, onnx_path: Path) -> Path:
    """The encoder as ONNX (re-exported when the encoder is newer than the file)."""
    if onnx_path.is_file() and onnx_path.stat().st_mtime >= encoder_file.stat().st_mtime:
        _log(f"reusing the exported model: {onnx_path}")
        return onnx_path
    from export.onnx import export_onnx
    _log(f"exporting the encoder to {onnx_path}")
    try:
        report = export_onnx(encoder_file, onnx_path, input_kind="uint8", overwrite=True)
    except Exception as e:  # noqa: BLE001 - export's own error types (bad input, failed verification)
        raise QuickstartError(f"export failed: {e}") from None
    v = report.get("verification", {})
    if v.get("passed") is not None:
        _log(f"exported and verified against PyTorch (min cosine {v.get('min_cosine', float('nan')):.6f})")
    return onnx_path


def index_images(encoder, images: Path, index_dir: Path, progress: bool = True):
    """The index of `images` under `index_dir`: built, reused, extended with new images, or rebuilt
    when the encoder changed."""
    from .faiss_index import SearchIndex, is_index_dir
    from .ops import add_collection, build_index
    if is_index_dir(index_dir):
        index = SearchIndex.load(index_dir)
        if index.model.get("fingerprint") == encoder.model["fingerprint"]:
            report = add_collection(index, encoder, images, progress=progress)
            _log(f"index {index_dir}: {report.line()}; {len(index)} images")
            return index
        _log("the encoder changed since the index was built: building it anew")
    index, report = build_index(encoder, images, index_dir, force=True, progress=progress, log=_log)
    _log(f"indexed {len(index)} images into {index_dir} ({len(report.skipped)} unreadable skipped)")
    return index


def compare_with_random_init(encoder_file: Path, images: Path, k: int = 10) -> dict | None:
    """precision@k over the labelled images (each querying the others): the trained encoder
    against the same architecture at random initialisation. None without labels."""
    import torch

    from trainer.checkpoint import load_encoder
    from trainer.data import open_collection
    from trainer.models import build_encoder

    from .retrieval import embed_torch, precision_at_k
    collection = open_collection(str(images))
    if collection.labels is None or len(set(collection.labels)) < 2 or len(collection) <= k:
        return None
    trained, info = load_encoder(encoder_file)
    torch.manual_seed(0)
    random_encoder, _ = build_encoder(info["arch"], info["stem"])
    out = {}
    for name, enc in (("random_init", random_encoder.eval()), ("byol", trained)):
        vectors, labels, _ = embed_torch(enc, collection, info["preprocessing"])
        out[name] = round(precision_at_k(vectors, labels, k), 4)
    return out


def run(args) -> int:
    """`python -m app` without --index (argument names: see app.__main__)."""
    from trainer.data import DataError, open_collection

    from .embedding import open_encoder
    from .ops import USER_ERRORS, AppError
    images = Path(args.images).expanduser() if args.images else SAMPLE_ZIP
    started = time.perf_counter()
    try:
        collection = open_collection(str(images))
        work = Path(args.work) if args.work_exact else work_dir_for(images, Path(args.work))
        work.mkdir(parents=True, exist_ok=True)
        _log(f"images: {images} ({len(collection)} files); working folder: {work}")
        if args.model or args.server:
            encoder = open_encoder(args.model, args.server, args.model_name)
            encoder_file = None
        else:
            encoder_file = train(images, work / "run", args.train_time, args.retrain, len(collection),
                                 steps=args.train_steps)
            onnx_path = export(encoder_file, work / "model.onnx")
            encoder = open_encoder(str(onnx_path))
        index = index_images(encoder, images, work / "index", progress=not args.no_progress)
        summary = {"images": str(images), "work": str(work), "index": str(work / "index"), "count": len(index),
                   "model": str(work / "model.onnx") if encoder_file else encoder.source}
        if encoder_file is not None and args.compare:
            scores = compare_with_random_init(encoder_file, images)
            if scores:
                summary["precision_at_10"] = scores
                _log(f"precision@10 (neighbours sharing the query's label): random init {scores['random_init']:.3f}"
                     f" -> BYOL {scores['byol']:.3f}")
        summary["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(summary), flush=True)
    except (QuickstartError, DataError, AppError) + USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_app:
        return 0
    from .ui import AppState, launch
    examples = example_files() if images == SAMPLE_ZIP else sample_examples(index, work / "examples")
    launch(AppState(index, encoder, k=args.k, examples=examples), host=args.host, port=args.port)
    return 0


def sample_examples(index, folder: Path, n: int = 6) -> list[Path]:
    """A few indexed images (one per label when there are labels) copied out as example queries."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    chosen, seen = [], set()
    for i in np.random.default_rng(0).permutation(len(index)):
        label = index.items[int(i)].get("label")
        if label in seen and len(seen) < n:
            continue
        seen.add(label)
        chosen.append(int(i))
        if len(chosen) == n:
            break
    paths = []
    for i in chosen:
        try:
            image = index.load_image(i)
        except ValueError:
            continue
        path = folder / f"example_{i}.png"
        image.save(path)
        paths.append(path)
    return paths
