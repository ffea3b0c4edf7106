"""The Gradio app: search an index by image, extract embeddings, add images to the index.

Three tabs over one index and one encoder (in process or a server):
  Search   upload, paste or pick an example image; the k nearest indexed images as a gallery
           captioned with cosine similarity and label (or path)
  Embed    one or more images in; their embeddings shown and downloadable as .npy and JSON
  Index    what is loaded (size, model, index type, recall), and adding images from the page

The handlers (`AppState.search`, `.embed`, `.add`, `.describe`) are plain functions, tested
without a browser. Any failure reaches the page as a one-line message in the tab's status box;
tracebacks go to the server's log only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .embedding import Encoder
from .faiss_index import SearchIndex
from .ops import USER_ERRORS, AppError, add_files, embed_one, query

log = logging.getLogger("byolkit.app")
THUMBNAIL = 192     # gallery images are scaled to fit this square (a CPU encoder's images are small anyway)
MAX_K = 100
PREVIEW_DIMS = 8    # embedding values shown on the page per image; the downloads hold all of them


_IO_REPR = re.compile(r"\s*<_io\.[A-Za-z]+ name=(?:'[^']*'|\d+)>")


def _clean(text: str) -> str:
    """Pillow names the file object it was given (<_io.BufferedReader name=...>): not for the page."""
    return _IO_REPR.sub("", text)


def _message(e: Exception) -> str:
    if isinstance(e, USER_ERRORS + (AppError,)):
        return _clean(str(e))
    log.error("unexpected error\n%s", traceback.format_exc())
    return f"internal error ({type(e).__name__}: {e}); details are in the server's log"


def _status(text: str, error: bool = False) -> str:
    return f"**Error:** {text}" if error else text


def _as_image(value):
    """What a Gradio input hands over (PIL image, numpy array, file path, file object) -> PIL/path/bytes."""
    if value is None:
        return None
    if isinstance(value, dict) and "path" in value:  # FileData-like
        return value["path"]
    path = getattr(value, "name", None) if not isinstance(value, (str, Path)) else value
    if isinstance(value, np.ndarray):
        from PIL import Image
        return Image.fromarray(value.astype(np.uint8)).convert("RGB")
    return path if path is not None else value


class AppState:
    """The loaded index and encoder, and the handlers the page calls."""

    def __init__(self, index: SearchIndex, encoder: Encoder, *, k: int = 10, examples=(), downloads_dir=None):
        self.index, self.encoder, self.k = index, encoder, int(k)
        self.examples = [str(p) for p in examples]
        self.lock = threading.RLock()  # searches read the index while an upload may be extending it
        base = downloads_dir or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()
        Path(base).mkdir(parents=True, exist_ok=True)
        self.downloads = Path(tempfile.mkdtemp(prefix="byolkit-embeddings-", dir=base))

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
                hits = query(self.index, self.encoder, image, k)
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
            image = self.index.load_image(i)
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
                    vectors.append(embed_one(self.encoder, path))
                    names.append(name)
                except USER_ERRORS as e:
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
        sources = ", ".join(f"{s['kind']} `{s['path']}`" for s in info["sources"]) or "-"
        labels = info["labels"]
        rows = [("images", f"{info['count']}" + (f" ({ix.skipped} unreadable skipped)" if ix.skipped else "")),
                ("index type", f"{ix.kind} ({'chosen by size' if ix.requested == 'auto' else 'asked for'}); {quality}"),
                ("model", (f"{m.get('arch', '?')} ({m.get('stem', '?')} stem), {ix.dim}-d embeddings, "
                          f"input {m.get('input_size', '?')} px, fingerprint `{m.get('fingerprint')}`")),
                ("encoder", f"`{self.encoder.source}`"),
                ("sources", sources),
                ("labels", ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "") if labels else "-"),
                ("location", f"`{ix.path}`" if ix.path else "not saved"),
                ("updated", ix.updated or ix.created or "-")]
        return "| index | |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)

    def add(self, files, label=""):
        """-> (status markdown, index description)."""
        try:
            files = [_as_image(f) for f in (files or []) if f is not None]
            if not files:
                raise AppError("choose one or more images to add")
            label = (label or "").strip() or None
            with self.lock:
                report = add_files(self.index, self.encoder, files, labels=[label] * len(files))
            status = f"{report.line()}; the index now holds {len(self.index)} images"
            if report.skipped:
                status += ". Unreadable: " + "; ".join(f"{n} ({_clean(r)})" for n, r in report.skipped[:5])
            return _status(status), self.describe()
        except Exception as e:  # noqa: BLE001
            return _status(_message(e), error=True), self.describe()


def build_app(state: AppState):
    """The Gradio Blocks page over `state`."""
    import gradio as gr

    with gr.Blocks(title="byolkit: similar images", analytics_enabled=False) as demo:
        gr.Markdown("# byolkit: similar images\nFind the indexed images nearest to any picture, by cosine "
                    "similarity of BYOL embeddings.")
        with gr.Tab("Search", id="search"):
            with gr.Row():
                with gr.Column(scale=1):
                    query_image = gr.Image(label="Query image", type="pil", sources=["upload", "clipboard"],
                                           elem_id="query-image", height=256)
                    k = gr.Slider(1, MAX_K, value=state.k, step=1, label="k (neighbours)", elem_id="k-slider")
                    search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                    if state.examples:
                        gr.Examples(examples=[[p] for p in state.examples], inputs=[query_image],
                                    label="Examples")
                with gr.Column(scale=2):
                    search_status = gr.Markdown(elem_id="search-status")
                    gallery = gr.Gallery(label="Nearest neighbours", columns=5, height="auto", object_fit="contain",
                                         elem_id="neighbours")
            search_button.click(state.search, [query_image, k], [gallery, search_status])
            # a new query image (uploaded, pasted or an example picked) searches at once
            query_image.change(state.search_if_image, [query_image, k], [gallery, search_status])

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
        demo.load(state.describe, None, info)
    return demo


def launch(state: AppState, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; with block=False returns (demo, url) and keeps serving in the background."""
    demo = build_app(state)
    allowed = sorted({str(Path(p).resolve().parent) for p in state.examples} | {str(state.downloads)})
    demo.queue(default_concurrency_limit=2)

    def start():
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=False,
                                allowed_paths=allowed, quiet=True, ssr_mode=False)
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("byolkit app: stopped", flush=True)
    return demo, url
