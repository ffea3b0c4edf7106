"""The page itself, in real headless Chromium (playwright driving the system's chromium).

Opens the app over a real index and the stand-in ONNX encoder, uploads a query image, waits for
k neighbour images, changes k, embeds two images on the Embed tab and downloads the .npy, adds an
image on the Index tab; then what a hostile visitor would try: an image over the pixel limit,
markup in a label, files outside the app's own folder, an upload over the size limit, and what is
left on disk when the page stops; and, over an encoder the main job's own steps trained, the Model
tab with its comparison and training curve. Screenshots go to test-artifacts/ at the repository root (or
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
MAX_PIXELS = 5_000          # the test images are 44x36 = 1584 pixels
MAX_UPLOAD = 200_000        # bytes
HOSTILE_LABEL = "<img src=x onerror=alert(1)>**bold** [link](http://evil.example)"


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
    examples = [image_folder / "red" / "img_00.png", image_folder / "README.txt"]
    state = ui.AppState(index, encoder, k=4, examples=examples,
                        max_pixels=MAX_PIXELS, max_upload_bytes=MAX_UPLOAD)
    demo, url = ui.launch(state, port=free_port(), block=False)
    yield state, url, demo
    demo.close()
    state.close()


def test_page_in_chromium(served, image_folder, tmp_path, artifacts):
    executable = chromium_path()
    if executable is None:  # only a missing GPU may skip: a missing browser is a failed set-up
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    state, url, demo = served
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
            page.locator("#add-label").locator("textarea, input").first.fill(HOSTILE_LABEL)
            page.click("#add-button")
            page.locator("#add-status", has_text="the index now holds 19 images").wait_for()
            assert "| images | 19 |" not in page.locator("#index-info").inner_text()  # rendered as a table
            assert "19" in page.locator("#index-info").inner_text()
            # the label is shown as the text it is: no image, no link, no emphasis made of it
            page.locator("#index-info", has_text="<img src=x onerror=alert(1)>**bold** [link](").wait_for()
            assert page.locator("#index-info img, #index-info a, #index-info strong").count() == 0
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
            assert "/gradio/" not in status.inner_text() and str(tmp_path) not in status.inner_text()
            assert "Traceback" not in page.content()

            # Search: an image over the pixel limit is refused by the app, from its header, with its message
            page.get_by_role("tab", name="Search").click()
            big = tmp_path / "big.png"
            big.write_bytes(image_bytes(make_image((10, 10, 10), 1, size=(100, 100)), "PNG"))
            page.set_input_files("#query-image input[type=file]", str(big))
            status = page.locator("#search-status", has_text="above the limit")
            status.wait_for()
            want = f"Error: image big.png is 100x100 pixels, above the limit of {MAX_PIXELS}"
            assert status.inner_text().strip() == want
        finally:
            browser.close()
    assert len(state.index) == 19

    # files: the examples are the app's copies, the user's folder is not served; uploads are bounded
    import httpx
    assert [Path(p).parent for p in state.examples] == [state.workdir / "examples"]  # README.txt left out
    for secret in (image_folder / "README.txt", image_folder / "red" / "img_00.png", state.index.path / "index.json"):
        assert httpx.get(f"{url}gradio_api/file={secret}").status_code in (403, 404), secret
    upload = f"{url}gradio_api/upload"
    assert httpx.post(upload, files={"files": ("a.png", b"\0" * 1000)}).status_code == 200
    refused = httpx.post(upload, files={"files": ("b.png", b"\0" * (MAX_UPLOAD + 1))})
    assert refused.status_code == 413
    # when the page stops, nothing it kept (uploads, downloads, examples) is left
    assert list((state.workdir / "gradio").rglob("big.png"))  # Gradio keeps uploads in the app's folder
    demo.close()
    state.close()
    assert not state.workdir.exists()
    assert not [p for p in (tmp_path / "gradio").rglob("*.png")]  # nor anywhere else


def test_model_tab(tmp_path, monkeypatch, image_folder, artifacts):
    """In Chromium (a short test name: the browser's socket path under tmp_path must stay short): the
    main job's steps on a few images (cpu-photos for 3 steps, export, index, comparison, curve),
    then the page's Model tab: precision@10 of BYOL beside random init and pixels, and the plot."""
    executable = chromium_path()
    if executable is None:
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from app import quickstart
    from app.report import model_report
    set_gradio_env(monkeypatch, tmp_path)
    run = tmp_path / "run"
    encoder_file = quickstart.train(image_folder, run, "3m", False, 18, steps=3)
    encoder = open_encoder(str(quickstart.export(encoder_file, tmp_path / "model.onnx")))
    index, _ = build_index(encoder, image_folder, tmp_path / "ix", progress=False)
    scores = quickstart.measured(run, encoder_file, image_folder)
    report = model_report(run, tmp_path / "training.png", shipped=True)
    assert report["scores"] == scores and report["plot"]
    state = ui.AppState(index, encoder, k=4, model_report=report)
    demo, url = ui.launch(state, port=free_port(), block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                page.get_by_role("tab", name="Model").click()
                info = page.locator("#model-info")
                info.get_by_text("normalised pixels").wait_for()
                text = info.inner_text()
                for line in (f"BYOL encoder (trained without labels)\t{scores['byol']:.3f}",
                             f"the same network at random initialisation\t{scores['random_init']:.3f}",
                             f"normalised pixels\t{scores['pixels']:.3f}"):
                    assert line in text, text
                assert "3 steps of 16 images, preset cpu-photos" in text and "CC BY 2.0" in text
                plot = page.locator("#training-plot img")
                plot.wait_for()
                page.wait_for_function("document.querySelector('#training-plot img').naturalWidth > 0")
                assert plot.evaluate("img => img.naturalWidth") == 900  # the 9 x 3.4 in figure at 100 dpi
                page.screenshot(path=str(artifacts / "app-model.png"), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
        state.close()


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
    state.close()
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
