"""Shared fixtures: tiny image data sets generated on the fly (no data is shared or downloaded).

Every data set is made under pytest's tmp_path_factory, session-scoped where the tests only read
it, so the whole suite writes a few hundred kilobytes of images once.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Image size (width, height) of the generated images: deliberately not square, not a power of two.
IMAGE_W, IMAGE_H = 44, 36
CLASS_COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 50), "red": (220, 30, 30)}
PER_CLASS = 6


def make_image(colour, seed: int, size=(IMAGE_W, IMAGE_H)) -> Image.Image:
    """A noisy image around `colour`: classes stay separable by their mean colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.asarray(colour, dtype=np.int16)[None, None, :]
    noise = rng.integers(-25, 26, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _labelled_files() -> dict[str, bytes]:
    """relative path -> encoded bytes for the ImageFolder layout; PNG and JPEG alternate."""
    files = {}
    seed = 0
    for cls, colour in CLASS_COLOURS.items():
        for i in range(PER_CLASS):
            fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
            files[f"{cls}/img_{i:02d}.{ext}"] = image_bytes(make_image(colour, seed), fmt)
            seed += 1
    return files


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture(scope="session")
def labelled_files() -> dict[str, bytes]:
    return _labelled_files()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, labelled_files) -> Path:
    """ImageFolder tree: blue/, green/, red/ with 6 images each (PNG and JPEG), 44x36 px."""
    root = _write_tree(tmp_path_factory.mktemp("folder") / "images", labelled_files)
    (root / "README.txt").write_text("not an image, must be ignored")
    (root / "green" / ".hidden.png").write_bytes(b"hidden files are ignored")
    return root


@pytest.fixture(scope="session")
def image_zip(tmp_path_factory, labelled_files) -> Path:
    """The same layout inside a zip archive (with directory entries and a macOS resource fork)."""
    path = tmp_path_factory.mktemp("zip") / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for cls in CLASS_COLOURS:
            zf.writestr(f"{cls}/", b"")
        for rel, data in labelled_files.items():
            zf.writestr(rel, data)
        zf.writestr("__MACOSX/red/._img_00.png", b"resource fork, not an image")
    return path


@pytest.fixture(scope="session")
def flat_folder(tmp_path_factory) -> Path:
    """Unlabelled: six images directly in the folder."""
    root = tmp_path_factory.mktemp("flat")
    for i, colour in enumerate(list(CLASS_COLOURS.values()) * 2):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpeg")
        (root / f"photo_{i}.{ext}").write_bytes(image_bytes(make_image(colour, 100 + i), fmt))
    return root


GOOD_IN_DIRTY = 6


@pytest.fixture(scope="session")
def dirty_folder(tmp_path_factory) -> Path:
    """Six good images, one truncated JPEG and one text file named .jpg."""
    root = tmp_path_factory.mktemp("dirty")
    for i in range(GOOD_IN_DIRTY):
        colour = list(CLASS_COLOURS.values())[i % 3]
        (root / f"good_{i}.png").write_bytes(image_bytes(make_image(colour, 200 + i), "PNG"))
    jpeg = image_bytes(make_image((128, 128, 128), 300, size=(64, 64)), "JPEG")
    (root / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n" * 4)
    return root


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    """A folder with no images (only a text file)."""
    root = tmp_path / "empty"
    root.mkdir()
    (root / "notes.txt").write_text("no images here")
    return root
