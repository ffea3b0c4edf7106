"""The main job: images in, a similar-image search page out, with no data of your own needed.

    python -m app                          # the photos shipped with byolkit (app/data/flowers.zip)
    python -m app --images ~/Pictures      # your own pictures (a folder or a zip archive)

Steps, each skipped when its result is already there (a second run starts in seconds):
  1. train a small BYOL encoder on the images (trainer.pretrain, preset cpu-photos, or gpu-photos
     on a CUDA device, for --train-time); a later run with a longer --train-time trains the same
     encoder on (trainer.pretrain --extend) instead of starting over;
  2. export it to ONNX (export.onnx), the file the index and the app embed with;
  3. build the index of the images, or add the ones that are new since the last run;
  4. measure precision@10 of the labelled images for the trained encoder, the same network at
     random initialisation and normalised pixels, and draw the training curve (app.report);
  5. open the app (app.ui) on http://HOST:PORT.
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
PRESET_CPU, PRESET_GPU = "cpu-photos", "gpu-photos"
MIN_EXTENSION_S = 15  # a longer --train-time continues the training when it adds at least this much


class QuickstartError(ValueError):
    """The main job cannot go on: too few images, a failed training or export."""


def _log(msg: str) -> None:
    print(f"[byolkit] {msg}", file=sys.stderr, flush=True)


def work_dir_for(images: Path, root: Path) -> Path:
    """runs/quickstart/<name>-<hash of the absolute path>: one work folder per image collection."""
    resolved = str(Path(images).expanduser().resolve())
    if Path(resolved) == SAMPLE_ZIP:
        return root / "flowers"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(resolved).stem).strip("-") or "images"
    return root / f"{slug}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def choose_preset() -> str:
    """gpu-photos where CUDA is available, else cpu-photos."""
    import torch
    return PRESET_GPU if torch.cuda.is_available() else PRESET_CPU


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def train(images: Path, run: Path, time_budget: str, retrain: bool, n_images: int, steps: int = 0) -> Path:
    """A trained encoder in `run`: reused when it has trained for `time_budget` (or `steps`) already,
    trained on when asked for more, trained anew otherwise (or with `retrain`)."""
    from trainer.config import preset
    from trainer.pretrain import parse_duration
    from trainer.pretrain import run as pretrain
    from trainer.runtime import USER_ERRORS
    encoder_file = run / "encoder.safetensors"
    if retrain and run.exists():
        import shutil
        shutil.rmtree(run)
    length = {"max_steps": steps} if steps else {"time_budget": parse_duration(time_budget)}
    if (run / "summary.json").is_file() and encoder_file.is_file():
        done = json.loads((run / "summary.json").read_text())
        more = steps - done["steps"] if steps else parse_duration(time_budget) - done["train_seconds"]
        trained = f"{done['steps']} steps, {_minutes(done['train_seconds'])}"
        if more < (1 if steps else MIN_EXTENSION_S):
            _log(f"reusing the encoder trained before: {encoder_file} ({trained}; a longer --train-time trains "
                 f"it on, --retrain starts over)")
            return encoder_file
        how = {"extend": True, **({"max_steps": more} if steps else {"time_budget": float(round(more))})}
        _log(f"continuing the encoder trained before ({trained}) for {f'{more} steps' if steps else _minutes(more)} "
             f"more, from its checkpoint (--retrain starts over)")
    else:
        if n_images < MIN_TRAIN_IMAGES:
            raise QuickstartError(f"{images} holds {n_images} readable images; training needs at least "
                                  f"{MIN_TRAIN_IMAGES} (or give an exported encoder with --model)")
        name = choose_preset()
        # the preset's batch, or what a small folder allows
        batch = min(preset(name).optim.batch_size, 2 ** (n_images.bit_length() - 1))
        how = {"preset": name, **length, "epochs": 10000, "batch_size": batch,
               "resume": (run / "checkpoint.pt").is_file()}  # an interrupted training continues
        _log(f"training a BYOL encoder on {n_images} images for {f'{steps} steps' if steps else time_budget} "
             f"({name} preset, batch {batch})")
    try:
        pretrain(run, str(images), overrides=["data.workers=0"], progress=False, **how)
    except (*USER_ERRORS, ValueError) as e:
        raise QuickstartError(f"training failed: {e}") from None
    if not encoder_file.is_file():
        raise QuickstartError(f"training failed: no encoder in {run}")
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


def compare(encoder_file: Path, images: Path, k: int = 10) -> dict | None:
    """precision@k over the labelled images (each querying the others) of the trained encoder, the
    same architecture at random initialisation and normalised pixels. None without labels."""
    import torch

    from trainer.checkpoint import load_encoder
    from trainer.data import open_collection
    from trainer.models import build_encoder

    from .retrieval import embed_torch, pixel_vectors, precision_at_k
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
    vectors, labels = pixel_vectors(collection, info["preprocessing"])
    out["pixels"] = round(precision_at_k(vectors, labels, k), 4)
    out["chance"] = round(float(sum(c * c for c in _counts(labels))) / len(labels) ** 2, 4)
    return out


def _counts(labels) -> list[int]:
    import numpy as np
    return np.unique(labels, return_counts=True)[1].tolist()


def measured(run: Path, encoder_file: Path, images: Path) -> dict | None:
    """The comparison for the encoder's current step: from run/precision.jsonl when measured before,
    else measured now and appended there (the history the training plot marks)."""
    from .report import read_jsonl
    summary = json.loads((run / "summary.json").read_text())
    history = run / "precision.jsonl"
    for row in read_jsonl(history):
        if row["step"] == summary["steps"]:
            return row
    scores = compare(encoder_file, images)
    if scores is None:
        return None
    row = {"step": summary["steps"], "train_seconds": round(summary["train_seconds"], 1), **scores}
    with open(history, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


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
        report = None
        if encoder_file is not None:
            from .report import model_report
            run_dir = encoder_file.parent
            trained = json.loads((run_dir / "summary.json").read_text())
            summary["training"] = {"steps": trained["steps"], "seconds": round(trained["train_seconds"], 1),
                                   "preset": json.loads((run_dir / "config.json").read_text()).get("preset")}
            scores = measured(run_dir, encoder_file, images) if args.compare else None
            if scores:
                summary["precision_at_10"] = {k: scores[k] for k in ("byol", "random_init", "pixels", "chance")}
                _log(f"precision@10 (neighbours sharing the query's label; chance {scores['chance']:.3f}): "
                     f"normalised pixels {scores['pixels']:.3f}, random init {scores['random_init']:.3f}, "
                     f"BYOL {scores['byol']:.3f} after {_minutes(trained['train_seconds'])} "
                     f"({trained['steps']} steps)")
            report = model_report(run_dir, work / "training.png", shipped=images == SAMPLE_ZIP)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(summary), flush=True)
    except (QuickstartError, DataError, AppError) + USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_app:
        return 0
    from .ui import AppState, launch
    examples = example_files() if images == SAMPLE_ZIP else sample_examples(index, work / "examples")
    state = AppState(index, encoder, k=args.k, examples=examples, model_report=report, max_pixels=args.max_pixels,
                     max_upload_bytes=int(args.max_upload_mb * 2**20))
    launch(state, host=args.host, port=args.port)
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
