"""The page itself, in real headless Chromium (playwright driving the system's chromium).

Opens the app over a real index and the stand-in ONNX encoder, uploads a query image, waits for
k neighbour images, changes k, embeds two images on the Embed tab and downloads the .npy, adds an
image on the Index tab. Screenshots go to test-artifacts/ at the repository root (or
$BYOLKIT_TEST_ARTIFACTS), kept after the run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from app_util import free_port, make_colour_model, set_gradio_env
from conftest import REPO_ROOT, image_bytes, make_image

from app import ui
from app.embedding import open_encoder
from app.ops import build_index

LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("BYOLKIT_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("BYOLKIT_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def served(tmp_path, monkeypatch, image_folder):
    set_gradio_env(monkeypatch, tmp_path)
    encoder = open_encoder(str(make_colour_model(tmp_path / "colour.onnx")))
    index, _ = build_index(encoder, image_folder, tmp_path / "ix", progress=False)
    state = ui.AppState(index, encoder, k=4, examples=[image_folder / "red" / "img_00.png"])
    demo, url = ui.launch(state, port=free_port(), block=False)
    yield state, url
    demo.close()


def test_page_in_chromium(served, image_folder, tmp_path, artifacts):
    executable = chromium_path()
    if executable is None:  # only a missing GPU may skip: a missing browser is a failed set-up
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    state, url = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)

            # Search: a new query image runs the search; k = 4 neighbour images appear, captioned
            page.set_input_files("#query-image input[type=file]", str(image_folder / "green" / "img_02.png"))
            thumbs = page.locator("#neighbours .thumbnail-item img")
            thumbs.nth(3).wait_for()
            assert thumbs.count() == 4
            captions = page.locator("#neighbours .caption-label").all_inner_texts()
            assert captions[0] == "1.000 · green" and all(c.endswith("green") for c in captions)
            assert "4 nearest of 18 images" in page.locator("#search-status").inner_text()
            page.screenshot(path=str(artifacts / "app-search.png"), full_page=True)

            # k adjustable: 7 neighbours after changing the slider's number box and searching again
            k_box = page.locator("#k-slider input[type=number]")
            k_box.fill("7")
            k_box.press("Enter")
            page.click("#search-button")
            page.wait_for_function("document.querySelectorAll('#neighbours .thumbnail-item img').length == 7")

            # picking an example searches with it (the example is red/img_00.png)
            page.locator("img[src*='img_00.png']").first.click()
            page.wait_for_function("[...document.querySelectorAll('#neighbours .caption-label')]"
                                   ".map(e => e.textContent.trim()).join() .startsWith('1.000 · red')")
            assert all(c.endswith("red") for c in page.locator("#neighbours .caption-label").all_inner_texts()[:6])

            # Embed: two images in, a table, and the .npy download holds their embeddings
            page.get_by_role("tab", name="Embed").click()
            files = [str(image_folder / "red" / "img_00.png"), str(image_folder / "blue" / "img_01.jpg")]
            page.set_input_files("#embed-files input[type=file]", files)
            page.click("#embed-button")
            page.locator("#embed-status", has_text="2 embeddings of 16 dimensions").wait_for()
            with page.expect_download() as download:
                page.click("#download-npy")
            saved = tmp_path / "downloaded.npy"
            download.value.save_as(saved)
            matrix = np.load(saved)
            assert matrix.shape == (2, 16)
            np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
            page.screenshot(path=str(artifacts / "app-embed.png"), full_page=True)

            # Index: add an image from the page; the description follows
            page.get_by_role("tab", name="Index").click()
            new = tmp_path / "purple.png"
            new.write_bytes(image_bytes(make_image((150, 20, 200), 99), "PNG"))
            page.set_input_files("#add-files input[type=file]", str(new))
            page.click("#add-button")
            page.locator("#add-status", has_text="the index now holds 19 images").wait_for()
            assert "| images | 19 |" not in page.locator("#index-info").inner_text()  # rendered as a table
            assert "19" in page.locator("#index-info").inner_text()
            page.screenshot(path=str(artifacts / "app-index.png"), full_page=True)

            # an unreadable image among the uploads is reported on the page, not as a trace
            page.get_by_role("tab", name="Embed").click()
            bad = tmp_path / "bad.png"
            bad.write_text("not an image")
            page.set_input_files("#embed-files input[type=file]", str(bad))  # joins the two images above
            page.click("#embed-button")
            status = page.locator("#embed-status", has_text="Skipped 1 unreadable")
            status.wait_for()
            assert "bad.png: not a readable image" in status.inner_text() and "_io." not in status.inner_text()
            assert "Traceback" not in page.content()
        finally:
            browser.close()
    assert len(state.index) == 19


@pytest.fixture
def served_qdrant(tmp_path, monkeypatch, image_folder):
    """The same page over a Qdrant index (local mode) built through the command line."""
    from app.backend import Backend
    from app.index import main as index_main
    set_gradio_env(monkeypatch, tmp_path)
    model = make_colour_model(tmp_path / "colour.onnx")
    assert index_main(["build", "--images", str(image_folder), "--out", str(tmp_path / "photos"), "--model",
                       str(model), "--no-progress", "--backend", "qdrant", "--qdrant-path", str(tmp_path / "qd")]) == 0
    index = Backend("qdrant", qdrant_path=str(tmp_path / "qd")).open(tmp_path / "photos")
    state = ui.AppState(index, open_encoder(str(model)), k=4, examples=[image_folder / "red" / "img_00.png"])
    demo, url = ui.launch(state, port=free_port(), block=False)
    yield state, url
    demo.close()
    index.close()


def test_qdrant_page(served_qdrant, image_folder, tmp_path, artifacts):
    """Search and add behave as on FAISS: the page does not know which backend it has. (A short test
    name: Chromium's singleton socket lives under tmp_path, and a Unix socket path has at most 107 bytes.)"""
    executable = chromium_path()
    if executable is None:
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    state, url = served_qdrant
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.set_input_files("#query-image input[type=file]", str(image_folder / "green" / "img_02.png"))
            thumbs = page.locator("#neighbours .thumbnail-item img")
            thumbs.nth(3).wait_for()
            captions = page.locator("#neighbours .caption-label").all_inner_texts()
            assert captions[0] == "1.000 · green" and all(c.endswith("green") for c in captions)
            assert "4 nearest of 18 images (qdrant index)" in page.locator("#search-status").inner_text()
            assert page.evaluate("[...document.querySelectorAll('#neighbours .thumbnail-item img')]"
                                 ".every(i => i.naturalWidth > 0)")
            page.get_by_role("tab", name="Index").click()
            assert "Qdrant collection" in page.locator("#index-info").inner_text()
            new = tmp_path / "purple.png"
            new.write_bytes(image_bytes(make_image((150, 20, 200), 99), "PNG"))
            page.set_input_files("#add-files input[type=file]", str(new))
            page.click("#add-button")
            page.locator("#add-status", has_text="the index now holds 19 images").wait_for()
            page.screenshot(path=str(artifacts / "app-qdrant.png"), full_page=True)
            assert "Traceback" not in page.content()
        finally:
            browser.close()
    assert len(state.index) == 19 and (tmp_path / "photos" / "uploads").is_dir()
