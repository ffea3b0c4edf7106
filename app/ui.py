"""The Gradio app: search an index by image, extract embeddings, add images to the index.

Three tabs over one index and one encoder (in process or a server):
  Search   upload, paste or pick an example image; the k nearest indexed images as a gallery
           captioned with cosine similarity and label (or path)
  Embed    one or more images in; their embeddings shown and downloadable as .npy and JSON
  Index    what is loaded (size, model, index type, recall), and adding images from the page
and, after the main job trained the encoder, a fourth:
  Model    how it was trained, precision@10 against random initialisation and pixels, the curve

The handlers (`AppState.search`, `.embed`, `.add`, `.describe`) are plain functions, tested
without a browser. Any failure reaches the page as a one-line message in the tab's status box,
without the server's paths; tracebacks go to the server's log only.

What a visitor can make the app hold is bounded: uploads up to `max_upload_bytes` each (Gradio's
max_file_size), images up to `max_pixels` (checked from the header before decoding, and every
image reduced to the model's input size at once). Everything the app writes (uploads, downloads,
examples) lives in one private temporary folder of its own, cleaned by Gradio's delete_cache while
it runs and removed when it stops. Text from images, labels and files is escaped before it is shown.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from contract.preprocess import IMAGE_EXTENSIONS, MAX_PIXELS, ImageDecodeError, load_rgb

from . import MAX_UPLOAD_BYTES
from .embedding import Encoder
from .faiss_index import SearchIndex
from .ops import USER_ERRORS, AppError, add_files, embed_one, query

log = logging.getLogger("byolkit.app")
THUMBNAIL = 192     # gallery images are scaled to fit this square (a CPU encoder's images are small anyway)
MAX_K = 100
PREVIEW_DIMS = 8    # embedding values shown on the page per image; the downloads hold all of them
MAX_EXAMPLES = 12
MAX_EXAMPLE_BYTES = 10 * 2**20
DELETE_CACHE = (600, 3600)      # Gradio removes the app's temporary files older than an hour, every 10 minutes


_IO_REPR = re.compile(r"\s*<_io\.[A-Za-z]+ name=(?:'[^']*'|\d+)>")


def _temporary_roots() -> list[str]:
    """Folders whose paths say nothing to a visitor: Gradio's upload folder and the system's temp."""
    roots = {os.environ.get("GRADIO_TEMP_DIR"), tempfile.gettempdir()}
    return sorted((str(Path(r).resolve()) for r in roots if r), key=len, reverse=True)


def _clean(text: str) -> str:
    """A message for the page: no file objects (Pillow names them: <_io.BufferedReader name=...>)
    and no server folders (an upload is named by its file name only)."""
    text = _IO_REPR.sub("", text)
    for root in _temporary_roots():
        text = re.sub(re.escape(root) + r"/(?:[^/\s'\"]+/)*", "", text)
    return text


def _md(text) -> str:
    """Any text shown through Markdown, made inert: HTML escaped, and Markdown's link, emphasis,
    code and table characters (and bare URLs) written as character references."""
    text = html.escape(str(text).replace("\n", " "), quote=False)
    text = re.sub(r"[\\`*_\[\]|~!#]", lambda m: f"&#{ord(m.group())};", text)
    return re.sub(r"(?i)\bwww\.", lambda m: m.group()[:3] + "&#46;", text.replace("://", "&#58;//"))


def _message(e: Exception) -> str:
    if isinstance(e, USER_ERRORS + (AppError,)):
        return _clean(str(e))
    log.error("unexpected error\n%s", traceback.format_exc())
    return _clean(f"internal error ({type(e).__name__}: {e}); details are in the server's log")


def _status(text: str, error: bool = False) -> str:
    return f"**Error:** {_md(text)}" if error else _md(text)


def _as_image(value):
    """What a Gradio input hands over (PIL image, numpy array, file path, file object) -> PIL/path/bytes."""
    if value is None:
        return None
    if isinstance(value, dict) and "path" in value:  # FileData-like (the page's query image, unprocessed)
        if not value["path"]:
            raise AppError("the image did not arrive; upload it again")
        return value["path"]
    path = getattr(value, "name", None) if not isinstance(value, (str, Path)) else value
    if isinstance(value, np.ndarray):
        from PIL import Image
        return Image.fromarray(value.astype(np.uint8)).convert("RGB")
    return path if path is not None else value


class AppState:
    """The loaded index and encoder, and the handlers the page calls."""

    def __init__(self, index: SearchIndex, encoder: Encoder, *, k: int = 10, examples=(), downloads_dir=None,
                 max_pixels: int = MAX_PIXELS, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 model_report: dict | None = None):
        """`examples`: image files copied into the app's own folder (those that are not image files
        of at most MAX_EXAMPLE_BYTES and `max_pixels`, after the first MAX_EXAMPLES, are left out).
        `model_report`: app.report.model_report, the Model tab (None: no tab); its plot is copied
        into the app's own folder too."""
        self.index, self.encoder, self.k = index, encoder, int(k)
        self.max_pixels, self.max_upload_bytes = int(max_pixels), int(max_upload_bytes)
        self.lock = threading.RLock()  # searches read the index while an upload may be extending it
        base = downloads_dir or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()
        Path(base).mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="byolkit-app-", dir=base))  # 0700: this user's only
        self.downloads = self.workdir / "downloads"
        self.downloads.mkdir()
        self.examples = self._copy_examples(examples)
        self.model_report = self._copy_model_report(model_report)

    def _copy_model_report(self, report: dict | None) -> dict | None:
        if not report or not report.get("plot"):
            return report
        folder = self.workdir / "model"
        folder.mkdir()
        target = folder / "training.png"
        shutil.copyfile(report["plot"], target)
        return {**report, "plot": str(target)}

    def _copy_examples(self, files) -> list[str]:
        folder = self.workdir / "examples"
        folder.mkdir()
        kept = []
        for f in files:
            f = Path(f)
            if len(kept) == MAX_EXAMPLES:
                break
            try:
                if f.suffix.lower() not in IMAGE_EXTENSIONS or f.is_symlink() or not f.is_file() \
                        or f.stat().st_size > MAX_EXAMPLE_BYTES:
                    continue
                data = f.read_bytes()
                load_rgb(data, max_pixels=self.max_pixels)
            except (OSError, ImageDecodeError) as e:
                log.warning("example %s left out: %s", f, e)
                continue
            target = folder / f"{len(kept):02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', f.name)}"
            target.write_bytes(data)
            kept.append(str(target))
        return kept

    def close(self) -> None:
        """Remove the app's temporary folder (uploads, downloads, examples)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- Search ------------------------------------------------------------------------------
    def search(self, image, k=None):
        """-> (gallery [(PIL image, caption)], status markdown)."""
        try:
            image = _as_image(image)
            if image is None:
                raise AppError("give an image to search with: upload one, paste one, or pick an example")
            k = self.k if k is None or k == "" else int(k)
            if not 1 <= k <= MAX_K:
                raise AppError(f"k must be between 1 and {MAX_K}")
            started = time.perf_counter()
            with self.lock:
                hits = query(self.index, self.encoder, image, k, max_pixels=self.max_pixels)
                gallery = [(self._thumbnail(h["id"]), self._caption(h)) for h in hits]
            ms = (time.perf_counter() - started) * 1e3
            return gallery, _status(f"{len(hits)} nearest of {len(self.index)} images ({self.index.kind} index), "
                                    f"{ms:.0f} ms")
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            return [], _status(_message(e), error=True)

    def search_if_image(self, image, k=None):
        """The search on a new query image; clearing the image clears the results quietly."""
        return ([], "") if image is None else self.search(image, k)

    def _thumbnail(self, i: int):
        from PIL import Image
        try:
            image = self.index.load_image(i, reduce_to=THUMBNAIL)  # a JPEG decoded at up to 1/8 of its size
        except USER_ERRORS:  # an indexed file that has since gone: a grey tile, not a failed search
            return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
        if max(image.size) > THUMBNAIL:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
        return image

    @staticmethod
    def _caption(hit: dict) -> str:
        what = hit["label"] or Path(hit["name"]).name
        return f"{hit['score']:.3f} · {what}" if hit.get("label") else f"{hit['score']:.3f} · {hit['path']}"

    # -- Embed ---------------------------------------------------------------------------------
    def embed(self, files):
        """-> (table rows, .npy path, .json path, status markdown)."""
        try:
            files = [f for f in (files or []) if f is not None]
            if not files:
                raise AppError("add one or more images to embed")
            names, vectors, problems = [], [], []
            for f in files:
                path = _as_image(f)
                name = Path(str(path)).name if isinstance(path, (str, Path)) else f"image {len(names) + 1}"
                try:
                    vectors.append(embed_one(self.encoder, path, max_pixels=self.max_pixels))
                    names.append(name)
                except USER_ERRORS + (AppError,) as e:
                    problems.append(f"{name}: {_clean(str(e))}")
            if not vectors:
                raise AppError("no readable image among those given (" + "; ".join(problems) + ")")
            matrix = np.stack(vectors).astype(np.float32)
            npy, js = self._write_downloads(names, matrix)
            rows = [[n, *[round(float(v), 4) for v in vec[:PREVIEW_DIMS]], round(float(np.linalg.norm(vec)), 4)]
                    for n, vec in zip(names, matrix)]
            status = (f"{len(names)} embedding{'s' * (len(names) != 1)} of {matrix.shape[1]} dimensions "
                      f"(first {PREVIEW_DIMS} shown; L2-normalised); model fingerprint "
                      f"{self.encoder.model['fingerprint']}")
            if problems:
                status += f". Skipped {len(problems)} unreadable: " + "; ".join(problems)
            return rows, str(npy), str(js), _status(status)
        except Exception as e:  # noqa: BLE001
            return [], None, None, _status(_message(e), error=True)

    def _write_downloads(self, names, matrix):
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1e6) % 1_000_000:06d}"
        folder = self.downloads / stamp
        folder.mkdir(parents=True, exist_ok=True)
        npy, js = folder / "embeddings.npy", folder / "embeddings.json"
        np.save(npy, matrix)
        js.write_text(json.dumps({"model": self.encoder.model, "images": names,
                                  "embeddings": [[float(v) for v in row] for row in matrix]}) + "\n")
        return npy, js

    # -- Index ---------------------------------------------------------------------------------
    def describe(self) -> str:
        ix, m = self.index, self.index.model
        info = ix.info()
        if ix.kind == "flat":
            quality = "exact search"
        elif ix.kind == "qdrant":
            quality = f"Qdrant collection `{info['qdrant']['collection']}` at {info['qdrant']['at']}, cosine"
        elif ix.recall and ix.recall.get("value") is not None:
            r = ix.recall
            quality = f"recall@{r['k']} = {r['value']} against exact search ({r['queries']} held-out queries)"
        else:
            quality = "approximate; too few images to measure recall, searching exhaustively"
        sources = ", ".join(f"{s['kind']} {s['path']}" for s in info["sources"]) or "-"
        labels = info["labels"]
        rows = [("images", f"{info['count']}" + (f" ({ix.skipped} unreadable skipped)" if ix.skipped else "")),
                ("index type", f"{ix.kind} ({'chosen by size' if ix.requested == 'auto' else 'asked for'}); {quality}"),
                ("model", (f"{m.get('arch', '?')} ({m.get('stem', '?')} stem), {ix.dim}-d embeddings, "
                          f"input {m.get('input_size', '?')} px, fingerprint {m.get('fingerprint')}")),
                *([("int8", _int8_row(m["quantization"]))] if m.get("quantization") else []),
                ("encoder", self.encoder.source),
                ("sources", sources),
                ("labels", ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "") if labels else "-"),
                ("location", ix.path or "not saved"),
                ("updated", ix.updated or ix.created or "-")]
        return "| index | |\n| --- | --- |\n" + "\n".join(f"| {a} | {_md(b)} |" for a, b in rows)

    def add(self, files, label=""):
        """-> (status markdown, index description)."""
        try:
            files = [_as_image(f) for f in (files or []) if f is not None]
            if not files:
                raise AppError("choose one or more images to add")
            label = (label or "").strip() or None
            with self.lock:
                report = add_files(self.index, self.encoder, files, labels=[label] * len(files),
                                   max_pixels=self.max_pixels)
            status = f"{report.line()}; the index now holds {len(self.index)} images"
            if report.skipped:
                status += ". Unreadable: " + "; ".join(f"{n} ({_clean(r)})" for n, r in report.skipped[:5])
            return _status(status), self.describe()
        except Exception as e:  # noqa: BLE001
            return _status(_message(e), error=True), self.describe()


def _int8_row(q: dict) -> str:
    """The int8 model's guard figures (export.quantize), for the Index tab."""
    g = q.get("guard", {})
    return (f"int8 of float32 model {q.get('float_fingerprint')}: recall@{g.get('k', 10)} "
            f"{g.get('recall_at_10')} against float32 neighbours, cosine mean {g.get('cosine_mean')} / min "
            f"{g.get('cosine_min')} on {g.get('held_back')} held-back images ({q.get('method')} calibration on "
            f"{q.get('calibration', {}).get('images')} images)")


def build_app(state: AppState):
    """The Gradio Blocks page over `state`."""
    import gradio as gr

    with gr.Blocks(title="byolkit: similar images", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# byolkit: similar images\nFind the indexed images nearest to any picture, by cosine "
                    "similarity of BYOL embeddings.")
        with gr.Tab("Search", id="search"):
            with gr.Row():
                with gr.Column(scale=1):
                    # a file path, decoded by the handler through the preprocessing contract (pixel limit
                    # first); the events below skip Gradio's own decoding (preprocess=False)
                    query_image = gr.Image(label="Query image", type="filepath", image_mode=None,
                                           sources=["upload", "clipboard"], elem_id="query-image", height=256)
                    k = gr.Slider(1, MAX_K, value=state.k, step=1, label="k (neighbours)", elem_id="k-slider")
                    search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                    if state.examples:
                        gr.Examples(examples=[[p] for p in state.examples], inputs=[query_image],
                                    label="Examples")
                with gr.Column(scale=2):
                    search_status = gr.Markdown(elem_id="search-status")
                    gallery = gr.Gallery(label="Nearest neighbours", columns=5, height="auto", object_fit="contain",
                                         elem_id="neighbours")
            search_button.click(state.search, [query_image, k], [gallery, search_status], preprocess=False)
            # a new query image (uploaded, pasted or an example picked) searches at once
            query_image.change(state.search_if_image, [query_image, k], [gallery, search_status], preprocess=False)

        with gr.Tab("Embed", id="embed"):
            with gr.Row():
                with gr.Column(scale=1):
                    embed_files = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                          elem_id="embed-files")
                    embed_button = gr.Button("Embed", variant="primary", elem_id="embed-button")
                with gr.Column(scale=2):
                    embed_status = gr.Markdown(elem_id="embed-status")
                    table = gr.Dataframe(headers=["image", *[f"e{i}" for i in range(PREVIEW_DIMS)], "norm"],
                                         label="Embeddings (first values)", interactive=False, elem_id="embed-table")
                    with gr.Row():
                        npy = gr.DownloadButton("Download .npy", elem_id="download-npy", value=None)
                        js = gr.DownloadButton("Download JSON", elem_id="download-json", value=None)
            embed_button.click(state.embed, [embed_files], [table, npy, js, embed_status])

        with gr.Tab("Index", id="index"):
            info = gr.Markdown(state.describe(), elem_id="index-info")
            with gr.Row():
                add_files_input = gr.File(label="Images to add", file_count="multiple", file_types=["image"],
                                          elem_id="add-files")
                with gr.Column():
                    add_label = gr.Textbox(label="Label (optional)", elem_id="add-label")
                    add_button = gr.Button("Add to the index", variant="primary", elem_id="add-button")
                    add_status = gr.Markdown(elem_id="add-status")
            add_button.click(state.add, [add_files_input, add_label], [add_status, info])
        if state.model_report:
            model_tab(state.model_report)
        demo.load(state.describe, None, info)
    return demo


# -- Model ---------------------------------------------------------------------------------------
def model_tab(report: dict) -> None:
    """The Model tab (inside build_app's Blocks): how the main job trained the encoder, precision@10
    beside random initialisation and normalised pixels, and the training curve as a picture."""
    import gradio as gr
    with gr.Tab("Model", id="model"):
        gr.Markdown(report["markdown"], elem_id="model-info")
        if report.get("plot"):
            gr.Image(report["plot"], label="Training: loss and precision@10 over time", type="filepath",
                     interactive=False, elem_id="training-plot")


def launch(state: AppState, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; with block=False returns (demo, url) and keeps serving in the background
    (then demo.close() and state.close() stop it). Gradio keeps its files (uploads, the files it
    serves) in the app's own temporary folder, removed when the page stops."""
    os.environ["GRADIO_TEMP_DIR"] = str(state.workdir / "gradio")  # read by Gradio when the page is made
    demo = build_app(state)
    # only the app's own files; never a folder of the user's (the examples and the plot are copies)
    allowed = [str(state.workdir / "examples"), str(state.workdir / "model"), str(state.downloads)]
    demo.queue(default_concurrency_limit=2)

    def start():
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=False,
                                allowed_paths=allowed, quiet=True, ssr_mode=False,
                                max_file_size=state.max_upload_bytes)
        print(f"byolkit app: {url}  (index {state.index.path}, {len(state.index)} images; Ctrl-C stops it)",
              flush=True)
        return url

    if not block:
        return demo, start()

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (a service manager, kill) and SIGINT stop it the same way, from before the server
    # answers; SIGINT is set explicitly because a shell's background job inherits it ignored
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    url = None
    try:
        url = start()
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        state.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("byolkit app: stopped", flush=True)
    return demo, url
