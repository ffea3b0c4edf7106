"""What the index command line and the app do with an encoder and an index: build, add, query.

Every function here raises AppError (or a subclass) with a message meant for the user; the
command line prints it as `error: ...`, the app shows it on the page.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.preprocess import IMAGE_EXTENSIONS, MAX_PIXELS, ImageDecodeError, load_rgb
from trainer.data import DataError, open_collection

from .embedding import Encoder, EncoderError, embed_collection, source_of
from .faiss_index import (
    DEFAULT_TARGET_RECALL,
    KINDS,
    LOCK_NAME,
    SearchIndex,
    SearchIndexError,
    index_lock,
    is_index_dir,
)

UPLOADS_DIR = "uploads"  # images added from the app are kept here, inside the index directory

# The errors a user can cause (bad paths, foreign models, unreadable images): reported, never a traceback.
USER_ERRORS = (DataError, EncoderError, SearchIndexError, ImageDecodeError)


class AppError(ValueError):
    """A request that cannot be done as asked, with a message for the user."""


@dataclass
class AddReport:
    added: int = 0
    already: int = 0
    skipped: list = field(default_factory=list)  # [(name, reason)]

    def line(self) -> str:
        parts = [f"added {self.added} image{'s' * (self.added != 1)}"]
        if self.already:
            parts.append(f"{self.already} already in the index")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable skipped")
        return ", ".join(parts)


def open_images(spec) -> tuple[object, dict]:
    """A folder, a zip archive or a torchvision name -> (collection, source record)."""
    collection = open_collection(str(spec))
    return collection, source_of(collection, str(spec))


def check_build_target(out, force: bool) -> None:
    out = Path(out)
    if is_index_dir(out):
        if not force:
            raise AppError(f"{out} already holds an index; use `add` to extend it, or --force to build it anew")
    elif out.exists() and (not out.is_dir() or any(p.name != LOCK_NAME for p in out.iterdir())):
        raise AppError(f"{out} exists and is not an index; choose a new --out")


def build_index(encoder: Encoder, images, out, *, kind: str = "auto", target_recall: float = DEFAULT_TARGET_RECALL,
                batch_size: int = 64, force: bool = False, progress: bool = True, log=None,
                wait: bool = False) -> tuple[SearchIndex, AddReport]:
    """Embed every readable image of `images` and write a new index to `out` (atomically), holding
    the index's writers' lock throughout (IndexBusyError when another writer has it, unless `wait`)."""
    if kind not in KINDS:
        raise AppError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    check_build_target(out, force)
    collection, source = open_images(images)
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with index_lock(out, wait=wait, on_wait=log):
            check_build_target(out, force)  # again: another writer may have built it meanwhile
            done = embed_collection(encoder, collection, batch_size=batch_size, progress=progress)
            if not done.items:
                raise AppError(f"none of the {len(collection)} images in {images} could be read "
                               f"(first problem: {done.skipped[0][1] if done.skipped else 'none'})")
            items = [{"source": 0, **it} for it in done.items]
            index = SearchIndex.build(done.vectors, items, model=encoder.model, kind=kind, sources=[source],
                                      target_recall=target_recall, progress=log)
            index.record_unreadable(0, [], done.skipped)
            index.save(out)
    except BaseException:
        if created and not is_index_dir(out):  # leave no empty folder (or a lone lock file) behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return index, AddReport(added=len(items), skipped=done.skipped)


def _writing(index: SearchIndex, wait: bool, log=None):
    """The writers' lock of a saved FAISS index (brought up to date first); nothing for one never saved,
    nor for a Qdrant collection (the server orders concurrent writes; point ids are content-derived)."""
    writing = getattr(index, "writing", None)
    return writing(wait=wait, on_wait=log) if writing and index.path is not None else contextlib.nullcontext()


def add_collection(index: SearchIndex, encoder: Encoder, images, *, batch_size: int = 64,
                   progress: bool = True, log=None, wait: bool = False) -> AddReport:
    """Embed the images of `images` not yet in the index, append them, save the index: one
    read-modify-write under the index's writers' lock, over the newest generation on disk."""
    index.check_model(encoder.model)
    collection, source = open_images(images)
    with _writing(index, wait, log):
        return _add_collection(index, encoder, collection, source, batch_size=batch_size, progress=progress,
                               log=log)


def _add_collection(index, encoder, collection, source, *, batch_size, progress, log) -> AddReport:
    index.check_model(encoder.model)
    src = index.add_source(source["kind"], source["path"])
    present = index.present(src, [collection.name(i) for i in range(len(collection))])
    todo = [i for i in range(len(collection)) if collection.name(i) not in present]
    report = AddReport(already=len(collection) - len(todo))
    if todo:  # images unreadable last time are tried again
        done = embed_collection(encoder, collection, indices=todo, batch_size=batch_size, progress=progress)
        report.skipped = done.skipped
        report.added = index.add(done.vectors, [{"source": src, **it} for it in done.items], model=encoder.model,
                                 progress=log)
        before = list(index.unreadable)
        index.record_unreadable(src, [collection.name(i) for i in todo], done.skipped)
        if report.added or index.unreadable != before:
            _save(index)
    return report


def add_files(index: SearchIndex, encoder: Encoder, files, labels=None, *, max_pixels: int = MAX_PIXELS,
              wait: bool = False) -> AddReport:
    """Images given one by one (uploads: paths or bytes) -> copied into the index's uploads/ folder
    under a name made from their content, embedded, appended, saved.

    Each image is checked against `max_pixels` from its header, decoded and brought to the model's
    input size at once (only that small copy is kept); then, under the index's writers' lock and
    over the newest generation on disk, the new ones are stored and appended."""
    index.check_model(encoder.model)
    if index.path is None:
        raise AppError("this index has not been saved anywhere: it cannot keep uploaded images")
    report, decoded = AddReport(), []
    for n, f in enumerate(files):
        shown = Path(f).name if isinstance(f, (str, Path)) else f"image {n + 1}"
        try:
            data = Path(f).read_bytes() if isinstance(f, (str, Path)) else bytes(f)
            pixels = encoder.preprocessing.resize_and_crop(load_rgb(data, max_pixels=max_pixels))
        except OSError as e:
            report.skipped.append((shown, f"cannot read it ({e.strerror or e})"))
            continue
        except ImageDecodeError as e:
            report.skipped.append((shown, str(e).replace("<bytes>", shown)))
            continue
        ext = Path(str(f)).suffix.lower() if isinstance(f, (str, Path)) else ""
        if ext not in IMAGE_EXTENSIONS:
            ext = _extension_of(data)
        label = (labels[n] if labels else None) or None
        decoded.append((hashlib.sha256(data).hexdigest()[:20] + ext, data, pixels, label))
    if not decoded:
        return report
    with _writing(index, wait):
        src = index.add_source("folder", UPLOADS_DIR)  # relative: moves with the index directory
        present = index.present(src, [name for name, *_ in decoded])
        pending, items = [], []
        for name, data, pixels, label in decoded:
            if name in present:
                report.already += 1
                continue
            present.add(name)
            target = index.path / UPLOADS_DIR / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            pending.append(pixels)
            items.append({"source": src, "name": name, "label": label})
        if pending:
            report.added = index.add(encoder.embed(np.stack(pending)), items, model=encoder.model)
            _save(index)
    return report


def _extension_of(data: bytes) -> str:
    """The file extension of encoded image bytes, from their header (.png when unknown)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = "." + (image.format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - decoded fine a moment ago; the name only needs some extension
        ext = ".png"
    return ext if ext in IMAGE_EXTENSIONS else ".png"


def _save(index: SearchIndex) -> None:
    if index.path is not None:
        index.save(index.path)


def embed_one(encoder: Encoder, image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image (path, bytes, PIL image, uint8 array) -> its embedding [D]. Encoded images are
    checked against `max_pixels` from their header, then decoded and reduced to the model's input
    size at once, so that no full-size decoded image outlives this call."""
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise AppError(f"no image file at {image}")
    if isinstance(image, (str, Path, bytes, bytearray)):
        image = encoder.preprocessing.resize_and_crop(load_rgb(image if isinstance(image, (str, Path))
                                                               else bytes(image), max_pixels=max_pixels))
    return encoder.embed([image])[0]


def query(index: SearchIndex, encoder: Encoder, image, k: int = 10, max_pixels: int = MAX_PIXELS) -> list[dict]:
    """The k nearest indexed images of `image`: [{"rank", "id", "score", "name", "label", "path"}]."""
    index.check_model(encoder.model)
    hits = index.neighbours(embed_one(encoder, image, max_pixels), k)
    for h in hits:
        h["path"] = index.image_path(h["id"])
    return hits
