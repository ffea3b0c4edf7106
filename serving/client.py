"""EmbeddingClient: embeddings from a byolkit server (gRPC or HTTP) or from an ONNX file in process.

    from serving.client import EmbeddingClient

    client = EmbeddingClient("grpc://127.0.0.1:8001")       # or "http://127.0.0.1:8000"
    vectors = client.embed(["a.jpg", "b.png"])              # float32 [2, D], L2-normalised
    local = EmbeddingClient("model.onnx")                   # the same, in process, no server

`embed` takes a list (or one 4-D uint8 array) of image paths, encoded bytes, PIL images or uint8
RGB arrays [H, W, 3]. Paths and bytes go to the server's `<model>_image` model, which decodes
them there by the preprocessing contract; PIL images and arrays are preprocessed here
(`contract.preprocess`) and sent as uint8 tensors to `<model>` (so a Triton server with only the
exported repository works too). Arrays already at the model's input size are sent as they are.

Requests hold at most `batch_size` images (and never more than the server's max batch size), and
at most REQUEST_BYTES of them (the server refuses requests above its --max-request-bytes, 64 MiB
by default; a larger single image goes alone).
Every call has a deadline of `timeout` seconds, the connection set-up too (gRPC waits for its
channel to be ready within it). Connection failures (refused, closed mid-request, timed out) and
"server busy" answers (a full queue) are retried `retries` times with exponential backoff
(`backoff` seconds doubling up to 5 s), then raise ServerUnavailableError; a request the server
refuses raises EmbeddingError with the server's message, not retried. Not thread-safe: one client
per thread. `python -m serving.client` exits 2 for bad input, 1 when the server is unavailable.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from contract.deployment import DEFAULT_MODEL_NAME, INPUT_UINT8, METADATA_KEY, OUTPUT, decode_metadata
from contract.preprocess import ImageDecodeError, Preprocessing, load_rgb

from .engine import ModelError, OnnxEncoder, l2_normalize
from .repository import IMAGE_INPUT, image_model_name

MAX_BACKOFF_S = 5.0
# what one request carries at most (encoded images, or pixels as sent): half the server's default
# --max-request-bytes, leaving room for the protocol's own bytes
REQUEST_BYTES = 32 * 1024 * 1024


class EmbeddingError(RuntimeError):
    """Embeddings could not be computed: a refused request, an unreadable image, a missing model."""


class ServerUnavailableError(EmbeddingError, ConnectionError):
    """The server could not be reached, after the retries."""


def _is_connection_error(e: BaseException) -> bool:
    """Worth retrying: the server could not be reached, closed the connection, did not answer in
    time, or was busy (its queue full). Anything else is the server's answer to this request."""
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        status = str(e.status() or "")
        return ("UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status or status == "503"
                or "Connection" in (e.message() or "") and status in ("", "None"))
    # the HTTP client's "connection closed" (HTTPConnectionClosed) is neither an OSError nor a ConnectionError
    from geventhttpclient.response import HTTPParseError
    return isinstance(e, (ConnectionError, TimeoutError, OSError, HTTPParseError))


def _server_message(e: Exception) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        return e.message() or str(e)
    return f"{type(e).__name__}: {e}"


class _Remote:
    """tritonclient over gRPC or HTTP, with retries on connection errors."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float):
        scheme, _, address = url.partition("://")
        self.url, self.scheme, self.timeout, self.retries, self.backoff = url, scheme, timeout, retries, backoff
        self.retried = 0  # connection errors retried so far
        self._connected = False  # gRPC: the channel was seen ready (and no connection error since)
        if not address:
            raise EmbeddingError(f"{url!r}: expected grpc://host:port or http://host:port")
        if scheme == "grpc":
            import tritonclient.grpc as tc
            self.client = tc.InferenceServerClient(address)
            self._deadline = {"client_timeout": timeout}
        elif scheme in ("http", "https"):
            import tritonclient.http as tc
            self.client = tc.InferenceServerClient(address, ssl=scheme == "https", connection_timeout=timeout,
                                                   network_timeout=timeout)
            self._deadline = {}  # connection_timeout and network_timeout bound every call
        else:
            raise EmbeddingError(f"{url!r}: unknown scheme {scheme!r} (use grpc://, http:// or https://, "
                                 "or a path to an ONNX file)")
        self.tc = tc

    def _channel_ready(self):
        """gRPC connects lazily and, without a deadline, waits for a server that never answers: connect
        now, within the timeout (TimeoutError), and fail at once when the connection fails (ConnectionError)."""
        import grpc
        settled = threading.Event()
        seen = []

        def on_change(state):
            seen.append(state)
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                         grpc.ChannelConnectivity.SHUTDOWN):
                settled.set()

        channel = self.client._channel
        channel.subscribe(on_change, try_to_connect=True)
        try:
            if not settled.wait(self.timeout):
                raise TimeoutError(f"no gRPC connection within {self.timeout:g} s")
        finally:
            channel.unsubscribe(on_change)
        if seen[-1] != grpc.ChannelConnectivity.READY:
            raise ConnectionError(f"gRPC connection failed ({seen[-1].value[1]})")

    def call(self, what: str, fn, *args, **kwargs):
        delay = self.backoff
        kwargs.update(self._deadline)
        for attempt in range(self.retries + 1):
            try:
                if self.scheme == "grpc" and not self._connected:
                    self._channel_ready()
                    self._connected = True
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - sorted into connection errors and refusals below
                if not _is_connection_error(e):
                    raise EmbeddingError(f"{what}: {_server_message(e)}") from None
                self._connected = False
                if attempt == self.retries:
                    raise ServerUnavailableError(f"cannot reach {self.url} ({what}) after {attempt + 1} attempts: "
                                                 f"{_server_message(e)}") from None
                self.retried += 1
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    def config(self, model: str) -> dict | None:
        if not self.call("server readiness", self.client.is_server_live):
            raise ServerUnavailableError(f"{self.url} is not live")
        try:
            cfg = self.call(f"model {model}", self.client.get_model_config, model, **self._json())
        except ServerUnavailableError:
            raise
        except EmbeddingError:
            return None
        return cfg.get("config", cfg)

    def _json(self) -> dict:
        return {"as_json": True} if self.scheme == "grpc" else {}

    def models(self) -> list[str]:
        index = self.call("model index", self.client.get_model_repository_index, **self._json())
        index = index.get("models", []) if isinstance(index, dict) else index
        return sorted(m["name"] for m in index if m.get("state", "READY") == "READY")

    def infer(self, model: str, input_name: str, datatype: str, array: np.ndarray, raw: bool) -> np.ndarray:
        inp = self.tc.InferInput(input_name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        out = [self.tc.InferRequestedOutput(OUTPUT)]
        kwargs = {"parameters": {"raw": True}} if raw else {}
        result = self.call(model, self.client.infer, model, [inp], outputs=out, **kwargs)
        return result.as_numpy(OUTPUT)

    def close(self):
        self.client.close()


def _chunks(items: list, count: int, budget: int):
    """(index, bytes or uint8 pixels) items -> runs of at most `count` items and `budget` bytes as sent
    (pixels may go as float32: four bytes each); an item above the budget goes alone."""
    chunk, size = [], 0
    for item in items:
        x = item[1]
        n = len(x) if isinstance(x, (bytes, bytearray)) else x.nbytes * 4
        if chunk and (len(chunk) == count or size + n > budget):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


class EmbeddingClient:
    """Embeddings from `target`: "grpc://host:port", "http://host:port" or an ONNX file path.

    model: the served model's name (default byol_encoder). decode: where paths and bytes are
    decoded, "auto" (on the server when it serves `<model>_image`, else here), "server" or
    "client". preprocessing: only for servers whose model config carries no byolkit metadata.
    device, threads: ONNX Runtime settings when running an ONNX file in process.
    """

    def __init__(self, target, model: str = DEFAULT_MODEL_NAME, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, decode: str = "auto", preprocessing: Preprocessing | None = None,
                 device: str = "auto", threads: int = 0):
        if decode not in ("auto", "server", "client"):
            raise ValueError(f"decode must be auto, server or client, got {decode!r}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self.target, self.model = str(target), model
        self.remote: _Remote | None = None
        self.local: OnnxEncoder | None = None
        self.max_image_batch: int | None = None
        if "://" in self.target:
            self.remote = _Remote(self.target, timeout, retries, backoff)
            self._connect(decode, preprocessing)
        else:
            try:
                self.local = OnnxEncoder(self.target, device=device, threads=threads)
            except ModelError as e:
                raise EmbeddingError(str(e)) from None
            self.preprocessing = preprocessing or self.local.preprocessing
            self.info = self.local.info
            self.input_name = self.local.input_name
            self.embedding_dim = self.local.embedding_dim
            self.max_batch_size = None
            self.server_decodes = False

    def _connect(self, decode: str, preprocessing: Preprocessing | None):
        cfg = self.remote.config(self.model)
        if cfg is None:
            try:  # the repository index may be restricted (serving.server restricts it)
                served = f" (it serves: {', '.join(self.remote.models()) or 'nothing'})"
            except EmbeddingError:
                served = ""
            raise EmbeddingError(f"{self.target} serves no model {self.model!r}{served}")
        meta = cfg.get("parameters", {}).get(METADATA_KEY, {}).get("string_value")
        self.info = decode_metadata(meta) if meta else None
        self.preprocessing = preprocessing or (self.info["preprocessing"] if self.info else None)
        inp, out = cfg["input"][0], cfg["output"][0]
        self.input_name = inp["name"]
        self.embedding_dim = int(out["dims"][-1])
        self.max_batch_size = int(cfg.get("max_batch_size", 0)) or None
        image_cfg = self.remote.config(image_model_name(self.model)) if decode != "client" else None
        if decode == "server" and image_cfg is None:
            raise EmbeddingError(f"{self.target} serves no {image_model_name(self.model)!r} to decode images "
                                 "(use decode='client')")
        self.server_decodes = image_cfg is not None
        if self.server_decodes:
            self.max_image_batch = int(image_cfg.get("max_batch_size", 0)) or None

    # -- inputs ---------------------------------------------------------------------------------
    def _need_preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            raise EmbeddingError(f"model {self.model!r} carries no byolkit metadata to preprocess images by; "
                                 "pass preprocessing=Preprocessing(...)")
        return self.preprocessing

    def _pixels(self, item, index: int) -> np.ndarray:
        """A PIL image, an array or (decoded here) encoded bytes -> uint8 [S, S, 3]."""
        pre = self._need_preprocessing()
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
                raise EmbeddingError(f"image {index}: arrays must be uint8 RGB [H, W, 3], got {item.dtype} "
                                     f"{list(item.shape)}")
            if item.shape[:2] == (pre.input_size, pre.input_size):
                return item
            item = Image.fromarray(item, "RGB")
        try:
            if isinstance(item, Image.Image):
                return pre.resize_and_crop(load_rgb(item))
            if self.local is not None:
                return self.local.decode(item)
            return pre(item)
        except ImageDecodeError as e:
            raise EmbeddingError(f"image {index}: {e}") from None

    @staticmethod
    def _encoded(item, index: int) -> bytes | None:
        """Paths and bytes -> the encoded image; anything else -> None."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            return bytes(item)
        if isinstance(item, (str, Path)):
            try:
                return Path(item).read_bytes()
            except OSError as e:
                raise EmbeddingError(f"image {index}: cannot read {item}: {e.strerror or e}") from None
        return None

    # -- embeddings ---------------------------------------------------------------------------------
    def embed(self, images, batch_size: int = 32, normalize: bool = True) -> np.ndarray:
        """Images -> float32 [N, D], L2-normalised unless `normalize` is False (the encoder's raw output).

        images: a list of paths, bytes, PIL images and uint8 arrays [H, W, 3] (mixed freely), or
        one uint8 array [N, H, W, 3].
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, Path, bytes, bytearray, Image.Image, np.ndarray)):
            raise TypeError("embed takes a list of images (or one uint8 array [N, H, W, 3])")
        images = list(images)
        out = np.zeros((len(images), self.embedding_dim), np.float32)
        encoded, tensors = [], []  # (index, bytes) decoded by the server / (index, uint8 pixels)
        for i, item in enumerate(images):
            data = self._encoded(item, i)
            if data is not None and self.server_decodes:
                encoded.append((i, data))
            else:
                tensors.append((i, self._pixels(item if data is None else data, i)))
        if encoded:
            self._run(encoded, out, batch_size, normalize, image=True)
        if tensors:
            self._run(tensors, out, batch_size, normalize, image=False)
        return out

    def _run(self, items: list, out: np.ndarray, batch_size: int, normalize: bool, image: bool):
        limit = (self.max_image_batch if image else self.max_batch_size) or batch_size
        for chunk in _chunks(items, min(batch_size, limit), REQUEST_BYTES):
            index = [i for i, _ in chunk]
            try:
                out[index] = self._batch([x for _, x in chunk], normalize, image)
            except EmbeddingError as e:
                if isinstance(e, ServerUnavailableError):
                    raise
                # the server names the image by its place in the request: give its place in `images`
                message = str(e).partition(": ")[2] or str(e)
                m = re.match(r"image (\d+) of \d+: (.*)", message, re.DOTALL)
                if m and int(m.group(1)) < len(index):
                    raise EmbeddingError(f"image {index[int(m.group(1))]}: {m.group(2)}") from None
                where = f"image {index[0]}" if len(index) == 1 else f"images {index[0]}-{index[-1]}"
                raise EmbeddingError(f"{where}: {message}") from None

    def _batch(self, items: list, normalize: bool, image: bool) -> np.ndarray:
        if self.local is not None:
            return self.local.embed_pixels(np.stack(items), normalize=normalize)
        if image:
            array = np.array(items, dtype=np.object_).reshape(-1, 1)
            result = self.remote.infer(image_model_name(self.model), IMAGE_INPUT, "BYTES", array, not normalize)
        else:
            pixels = np.stack(items)
            if self.input_name == INPUT_UINT8:
                result = self.remote.infer(self.model, self.input_name, "UINT8", pixels, not normalize)
            else:
                array = self._need_preprocessing().normalize(pixels)
                result = self.remote.infer(self.model, self.input_name, "FP32", array, not normalize)
        result = np.asarray(result, np.float32)
        # a Triton with the exported repository only ignores `raw`: normalise here (idempotent)
        return l2_normalize(result) if normalize else result

    # -- misc ---------------------------------------------------------------------------------------
    def metadata(self) -> dict | None:
        """The byolkit metadata of the model (arch, embedding_dim, preprocessing, fingerprint, ...)."""
        return self.info

    def close(self):
        if self.remote is not None:
            self.remote.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"EmbeddingClient({self.target!r}, model={self.model!r})"


def _main(argv=None) -> int:  # a tiny command line: python -m serving.client TARGET IMAGE...
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m serving.client",
                                description="Print embeddings of images as JSON lines, from a server or an ONNX file.")
    p.add_argument("target", help="grpc://host:port, http://host:port or a path to an ONNX file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="served model name (default %(default)s)")
    p.add_argument("--raw", action="store_true", help="the encoder's raw output, not L2-normalised")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for each call and connection (default 30)")
    p.add_argument("--retries", type=int, default=3, help="retries after a connection error (default 3)")
    p.epilog = "Exit status: 0 done, 1 the server is unavailable, 2 bad input (or a request the server refused)."
    args = p.parse_args(argv)
    try:
        with EmbeddingClient(args.target, model=args.model, timeout=args.timeout, retries=args.retries) as client:
            vectors = client.embed(args.images, normalize=not args.raw)
    except EmbeddingError as e:  # 1: the server is unavailable; 2: bad input (or a request it refused)
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ServerUnavailableError) else 2
    for name, v in zip(args.images, vectors):
        print(json.dumps({"image": name, "embedding": [round(float(x), 6) for x in v]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
