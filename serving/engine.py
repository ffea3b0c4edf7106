"""ONNX Runtime around an exported encoder: the one inference path behind the server and the client.

The Triton model (`serving/triton_model.py`) and `EmbeddingClient` in process both call this
module, so the server and a script running the ONNX file in process compute embeddings the same
way: decode with the preprocessing contract (`contract.preprocess`), feed the graph's own input
(uint8 `images` or normalised float `pixel_values`), L2-normalise unless raw output is asked for.

Imports numpy, Pillow and onnxruntime only (no torch).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from contract.deployment import INPUT_FLOAT, INPUT_UINT8, METADATA_KEY, OUTPUT, decode_metadata
from contract.preprocess import MAX_PIXELS, ImageDecodeError, Preprocessing, load_rgb

# Encoded images larger than this are refused before decoding (a photo is a few megabytes).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")


class ModelError(ValueError):
    """An ONNX file that is not a usable byolkit encoder."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def onnx_providers(device: str) -> list:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> ONNX Runtime execution providers (CUDA first when asked)."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        return onnx_providers(device)
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"device {device}: this onnxruntime has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu: pip install 'byolkit[gpu]')")
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ModelError(f"device {device!r}: expected cuda or cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise ModelError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")


def require_providers(session, requested: list) -> None:
    """Refuse a session that silently lost a requested provider: ONNX Runtime only warns when it
    cannot load one (no CUDA or cuDNN libraries: CUDA -> CPU; TensorRT -> CUDA), so a "GPU" figure
    or server would run on the CPU."""
    active = session.get_providers()
    missing = [name for name in (p if isinstance(p, str) else p[0] for p in requested)
               if name != "CPUExecutionProvider" and name not in active]
    if missing:
        raise ModelError(f"ONNX Runtime could not start {', '.join(missing)} (it would run on {', '.join(active)}); "
                         "check the GPU libraries that onnxruntime-gpu needs (CUDA, cuDNN, TensorRT)")


class OnnxEncoder:
    """An exported byolkit encoder in ONNX Runtime.

    `input_name` is `images` (uint8 [N, H, W, 3], normalised inside the graph) or `pixel_values`
    (float32 [N, 3, H, W], already normalised); `info` is the decoded byolkit metadata.
    """

    def __init__(self, path, device: str = "auto", threads: int = 0):
        import onnxruntime as ort
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only; ORT's warnings about unused initialisers are noise
        providers = onnx_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for foreign files
            raise ModelError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e})") from None
        require_providers(self.session, providers)
        self.path = path
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ModelError(f"{path} carries no byolkit metadata (export it with python -m export.onnx)")
        self.info = decode_metadata(meta)
        self.preprocessing: Preprocessing = self.info["preprocessing"]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name not in (INPUT_UINT8, INPUT_FLOAT):
            raise ModelError(f"{path}: expected one input named {INPUT_UINT8} or {INPUT_FLOAT}, "
                             f"got {[i.name for i in inputs]}")
        if [o.name for o in outputs] != [OUTPUT]:
            raise ModelError(f"{path}: expected the single output {OUTPUT}, got {[o.name for o in outputs]}")
        self.input_name = inputs[0].name
        self.input_dtype = np.uint8 if self.input_name == INPUT_UINT8 else np.float32
        size = self.preprocessing.input_size
        self.item_shape = (size, size, 3) if self.input_name == INPUT_UINT8 else (3, size, size)
        self.embedding_dim = int(self.info["embedding_dim"])
        self.providers = self.session.get_providers()

    # -- images -> model input -------------------------------------------------------------
    def decode(self, data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
        """Encoded image bytes -> uint8 [H, W, 3] by the preprocessing contract's steps 1-3.

        Raises ImageDecodeError with a readable message for anything that is not a usable image.
        """
        if len(data) == 0:
            raise ImageDecodeError("empty image (0 bytes)")
        if len(data) > max_bytes:
            raise ImageDecodeError(f"encoded image is {len(data)} bytes, above the limit of {max_bytes}")
        try:
            image = load_rgb(bytes(data), max_pixels=max_pixels)
        except ImageDecodeError as e:  # Pillow names the in-memory file object: not for the client's eyes
            raise ImageDecodeError(_BYTESIO.sub("", str(e))) from None
        return self.preprocessing.resize_and_crop(image)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (steps 1-3 done) -> what the graph takes."""
        if self.input_name == INPUT_UINT8:
            return np.ascontiguousarray(pixels, dtype=np.uint8)
        return self.preprocessing.normalize(pixels)

    # -- inference ---------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph's input (uint8 images or float pixel values) -> raw float32 embeddings [N, D]."""
        out = self.session.run([OUTPUT], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def embed_pixels(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D], L2-normalised unless `normalize` is False."""
        out = self.run(self.model_input(pixels))
        return l2_normalize(out) if normalize else out
