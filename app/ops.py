"""What the index command line and the app do with an encoder and an index: build, add, query.

Every function here raises AppError (or a subclass) with a message meant for the user; the
command line prints it as `error: ...`, the app shows it on the page.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data import DataError, open_collection
from trainer.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb

from .embedding import Encoder, EncoderError, embed_collection, source_of
from .faiss_index import DEFAULT_TARGET_RECALL, KINDS, SearchIndex, SearchIndexError, is_index_dir

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
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AppError(f"{out} exists and is not an index; choose a new --out")


def build_index(encoder: Encoder, images, out, *, kind: str = "auto", target_recall: float = DEFAULT_TARGET_RECALL,
                batch_size: int = 64, force: bool = False, progress: bool = True, log=None) -> tuple[SearchIndex, AddReport]:
    """Embed every readable image of `images` and write a new index to `out` (atomically)."""
    if kind not in KINDS:
        raise AppError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    check_build_target(out, force)
    collection, source = open_images(images)
    done = embed_collection(encoder, collection, batch_size=batch_size, progress=progress)
    if not done.items:
        raise AppError(f"none of the {len(collection)} images in {images} could be read "
                       f"(first problem: {done.skipped[0][1] if done.skipped else 'none'})")
    items = [{"source": 0, **it} for it in done.items]
    index = SearchIndex.build(done.vectors, items, model=encoder.model, kind=kind, sources=[source],
                              target_recall=target_recall, progress=log)
    index.record_unreadable(0, [], done.skipped)
    index.save(out)
    return index, AddReport(added=len(items), skipped=done.skipped)


def add_collection(index: SearchIndex, encoder: Encoder, images, *, batch_size: int = 64,
                   progress: bool = True, log=None) -> AddReport:
    """Embed the images of `images` not yet in the index, append them, save the index."""
    index.check_model(encoder.model)
    collection, source = open_images(images)
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


def add_files(index: SearchIndex, encoder: Encoder, files, labels=None) -> AddReport:
    """Images given one by one (uploads: paths or bytes) -> copied into the index's uploads/ folder
    under a name made from their content, embedded, appended, saved."""
    index.check_model(encoder.model)
    if index.path is None:
        raise AppError("this index has not been saved anywhere: it cannot keep uploaded images")
    src = index.add_source("folder", UPLOADS_DIR)  # relative: moves with the index directory
    report, pending, names, kept_labels = AddReport(), [], [], []
    for n, f in enumerate(files):
        data = Path(f).read_bytes() if isinstance(f, (str, Path)) else bytes(f)
        shown = Path(f).name if isinstance(f, (str, Path)) else f"image {n + 1}"
        try:
            image = load_rgb(data)
        except ImageDecodeError as e:
            report.skipped.append((shown, str(e).replace("<bytes>", shown)))
            continue
        ext = Path(str(f)).suffix.lower() if isinstance(f, (str, Path)) else ""
        name = hashlib.sha256(data).hexdigest()[:20] + (ext if ext in IMAGE_EXTENSIONS else ".png")
        if name in names or index.present(src, [name]):
            report.already += 1
            continue
        target = index.path / UPLOADS_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if ext in IMAGE_EXTENSIONS:
            target.write_bytes(data)
        else:
            image.save(target)
        pending.append(image)
        names.append(name)
        kept_labels.append((labels[n] if labels else None) or None)
    if pending:
        vectors = encoder.embed(pending)
        items = [{"source": src, "name": name, "label": label} for name, label in zip(names, kept_labels)]
        report.added = index.add(vectors, items, model=encoder.model)
        _save(index)
    return report


def _save(index: SearchIndex) -> None:
    if index.path is not None:
        index.save(index.path)


def embed_one(encoder: Encoder, image) -> np.ndarray:
    """One image (path, bytes, PIL image, uint8 array) -> its embedding [D]."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise AppError(f"no image file at {image}")
        image = load_rgb(image)  # a readable ImageDecodeError for non-images, before the encoder sees it
    elif isinstance(image, (bytes, bytearray)):
        image = load_rgb(bytes(image))
    return encoder.embed([image])[0]


def query(index: SearchIndex, encoder: Encoder, image, k: int = 10) -> list[dict]:
    """The k nearest indexed images of `image`: [{"rank", "id", "score", "name", "label", "path"}]."""
    index.check_model(encoder.model)
    hits = index.neighbours(embed_one(encoder, image), k)
    for h in hits:
        h["path"] = index.image_path(h["id"])
    return hits
