"""The app's handlers (app/ui.py AppState) without a browser, over a real index and the stand-in
ONNX encoder: search, embed and download, add from the page, and errors as page messages."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from app_util import make_colour_model, set_gradio_env
from conftest import CLASS_COLOURS, PER_CLASS, image_bytes, make_image
from PIL import Image

from app import ui
from app.embedding import open_encoder
from app.faiss_index import SearchIndex
from app.ops import build_index

N = PER_CLASS * len(CLASS_COLOURS)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_colour_model(tmp_path_factory.mktemp("model") / "colour.onnx")


@pytest.fixture
def state(tmp_path, monkeypatch, model_path, image_folder):
    set_gradio_env(monkeypatch, tmp_path)
    encoder = open_encoder(str(model_path))
    index, _ = build_index(encoder, image_folder, tmp_path / "ix", progress=False)
    return ui.AppState(index, encoder, k=5, examples=[image_folder / "red" / "img_00.png"])


def test_gallery_thumbnails_of_large_jpegs_are_reduced_on_decode(tmp_path, monkeypatch, model_path, image_folder):
    """Before: the Search tab decoded every indexed image at full size for its 192 px thumbnail (an 8000 x 8000
    photo: 192 MB for a moment). A JPEG is now decoded at 1/8 of its size."""
    set_gradio_env(monkeypatch, tmp_path)
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(folder / "red" / "big.jpg", quality=90)
    encoder = open_encoder(str(model_path))
    index, _ = build_index(encoder, folder, tmp_path / "ix", progress=False)
    big = next(i for i, it in enumerate(index.items) if it["name"].endswith("big.jpg"))
    from contract import preprocess
    decoded, real = [], preprocess.load_rgb

    def spy(*args, **kwargs):
        image = real(*args, **kwargs)
        decoded.append(image.size)
        return image
    monkeypatch.setattr(preprocess, "load_rgb", spy)
    thumbnail = ui.AppState(index, encoder)._thumbnail(big)
    assert thumbnail.size == (ui.THUMBNAIL, ui.THUMBNAIL * 3 // 4)
    assert decoded == [(500, 375)]  # 0.56 MB of pixels decoded instead of 36 MB


def test_search(state, image_folder):
    gallery, status = state.search(Image.open(image_folder / "blue" / "img_02.png"), 4)
    assert len(gallery) == 4 and "4 nearest of 18 images (flat index)" in status
    images, captions = zip(*gallery)
    assert all(isinstance(im, Image.Image) for im in images)
    assert captions[0].startswith("1.000 · blue") and all(c.endswith("blue") for c in captions)
    scores = [float(c.split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    # a file path (an example) and a numpy array work as queries too; k defaults to the app's
    assert len(state.search(str(image_folder / "green" / "img_01.jpg"), None)[0]) == 5
    assert len(state.search(np.asarray(make_image(CLASS_COLOURS["red"], 7)), 3)[0]) == 3


@pytest.mark.parametrize("query, k, needle", [
    (None, 5, "give an image to search with"),
    ("image", 0, "k must be between 1 and 100"),
    ("image", 101, "k must be between 1 and 100"),
    ("notes", 5, "not a readable image"),
])
def test_search_errors_are_page_messages(state, image_folder, tmp_path, query, k, needle):
    if query == "image":
        query = str(image_folder / "red" / "img_00.png")
    elif query == "notes":
        query = tmp_path / "notes.png"
        query.write_text("not an image")
        query = str(query)
    gallery, status = state.search(query, k)
    assert gallery == [] and status.startswith("**Error:**") and needle in status
    assert "Traceback" not in status


def test_unexpected_failure_is_a_message_not_a_trace(state, image_folder, monkeypatch, caplog):
    def boom(*a, **kw):
        raise RuntimeError("faiss exploded")

    monkeypatch.setattr(ui, "query", boom)
    gallery, status = state.search(str(image_folder / "red" / "img_00.png"), 3)
    assert gallery == [] and "internal error (RuntimeError: faiss exploded)" in status and "Traceback" not in status
    assert "Traceback" in caplog.text  # the details go to the server's log


def test_embed_and_downloads(state, image_folder, tmp_path):
    files = [str(image_folder / "red" / "img_00.png"), str(image_folder / "blue" / "img_01.jpg")]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    rows, npy, js, status = state.embed([*files, str(bad)])
    assert [r[0] for r in rows] == ["img_00.png", "img_01.jpg"] and len(rows[0]) == 1 + ui.PREVIEW_DIMS + 1
    assert abs(rows[0][-1] - 1.0) < 1e-3  # L2-normalised
    assert "2 embeddings of 16 dimensions" in status and "Skipped 1 unreadable: broken.png" in status
    matrix = np.load(npy)
    expected = state.encoder.embed([Image.open(f) for f in files])
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
    doc = json.loads(Path(js).read_text())
    assert doc["images"] == ["img_00.png", "img_01.jpg"] and doc["model"]["fingerprint"] == "colour0000000000"
    np.testing.assert_allclose(np.asarray(doc["embeddings"]), expected, atol=1e-5)
    # nothing readable: an error on the page, no downloads
    rows, npy, js, status = state.embed([str(bad)])
    assert rows == [] and npy is None and js is None and "no readable image" in status


def test_add_from_the_page(state, tmp_path):
    new = tmp_path / "purple.png"
    new.write_bytes(image_bytes(make_image((150, 20, 200), 99), "PNG"))
    status, info = state.add([str(new)], "purple")
    assert "added 1 image" in status and "the index now holds 19 images" in status and "| images | 19 |" in info
    uploads = list((state.index.path / "uploads").iterdir())
    assert len(uploads) == 1 and uploads[0].read_bytes() == new.read_bytes()
    status, _ = state.add([str(new)], "")
    assert "added 0 images, 1 already in the index" in status
    # saved: a fresh load finds the new image, labelled, first for its own query
    reloaded = SearchIndex.load(state.index.path)
    assert len(reloaded) == 19
    fresh = ui.AppState(reloaded, state.encoder)
    gallery, _ = fresh.search(str(new), 1)
    assert gallery[0][1].startswith("1.000 · purple")
    # the index directory can move: uploads are found relative to it
    moved = shutil.copytree(state.index.path, tmp_path / "moved")
    assert SearchIndex.load(moved).load_image(18).size == (44, 36)


def test_add_errors(state, tmp_path, model_path):
    status, _ = state.add([], "")
    assert status.startswith("**Error:**") and "choose one or more images" in status
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    status, _ = state.add([str(bad)], "")
    assert "added 0 images" in status and "Unreadable: bad.jpg" in status
    # an index of another model refuses the page's encoder
    other = open_encoder(str(make_colour_model(tmp_path / "other.onnx", seed=5)))
    foreign = ui.AppState(state.index, other)
    status, _ = foreign.add([str(bad)], "")
    assert "fingerprint" in status and status.startswith("**Error:**")
    assert "fingerprint colour0000000000" in foreign.search(str(bad), 3)[1]


def test_describe_and_page_builds(state):
    text = state.describe()
    for needle in ("| images | 18 |", "flat (chosen by size); exact search", "colour0000000000", "blue, green, red"):
        assert needle in text
    demo = ui.build_app(state)
    assert demo is not None


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, model_path, image_folder):
    set_gradio_env(monkeypatch, tmp_path)
    encoder = open_encoder(str(model_path))
    index, _ = build_index(encoder, image_folder, tmp_path / "ix", progress=False)
    small = ui.AppState(index, encoder, max_pixels=1000)  # the generated images are 44x36 = 1584 pixels
    image = str(image_folder / "red" / "img_00.png")
    for status in (small.search(image, 3)[1], small.embed([image])[3], small.add([image], "")[0]):
        assert "44x36 pixels, above the limit of 1000" in status, status
    assert len(SearchIndex.load(tmp_path / "ix")) == N


def test_page_text_is_inert_and_names_no_server_paths(state, tmp_path):
    upload = tmp_path / "gradio" / "0123abcd" / "we_ird.png"  # where Gradio keeps an upload
    upload.parent.mkdir(parents=True)
    upload.write_bytes(image_bytes(make_image((150, 20, 200), 5), "PNG"))
    hostile = "<img src=x onerror=alert(1)> **bold** [link](http://evil.example) | cell"
    status, info = state.add([str(upload)], hostile)
    assert "added 1 image" in status
    assert "<img" not in info and "**bold**" not in info and "](http" not in info and "| cell" not in info
    assert "&lt;img src=x onerror=alert(1)&gt; &#42;&#42;bold&#42;&#42;" in info
    broken = upload.with_name("bro_ken.png")
    broken.write_bytes(b"\x89PNG, but no")
    for status in (state.search(str(broken), 3)[1], state.embed([str(broken)])[3]):
        assert "not a readable image: bro&#95;ken.png" in status and str(tmp_path) not in status, status
