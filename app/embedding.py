"""Images -> embeddings for the index and the app: the encoder (in process or a server) and the walk.

The encoder is serving.client.EmbeddingClient, over an ONNX file in process or a byolkit server
(gRPC or HTTP). Image collections are trainer.data's: a folder (sub-folders name classes), a zip
archive of one, or a torchvision data set name. Each image is decoded and brought to the model's
input size here by the preprocessing contract (contract.preprocess) in a few threads, and sent
in batches; unreadable images are skipped and counted.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.deployment import DEFAULT_MODEL_NAME
from contract.preprocess import ImageDecodeError


class EncoderError(ValueError):
    """No usable encoder: a missing or foreign ONNX file, an unreachable server, no metadata."""


class Encoder:
    """An EmbeddingClient plus the model identity the index checks (fingerprint, embedding size)."""

    def __init__(self, client, source: str):
        self.client, self.source = client, source
        info = client.metadata() if hasattr(client, "metadata") else getattr(client, "info", None)
        if not info or not info.get("fingerprint"):
            raise EncoderError(f"the model at {source} carries no byolkit metadata (fingerprint, preprocessing): "
                               "an index cannot tell its embeddings from another model's. Export it with "
                               "python -m export.onnx")
        self.info = info
        self.preprocessing = client.preprocessing
        self.embedding_dim = int(client.embedding_dim)

    @property
    def model(self) -> dict:
        """What an index records about the model (JSON-ready)."""
        out = {k: self.info.get(k) for k in ("fingerprint", "arch", "stem", "head", "byolkit_version", "weights",
                                             "float_fingerprint", "quantization")
               if self.info.get(k) is not None}
        out["embedding_dim"] = self.embedding_dim
        out["input_size"] = self.preprocessing.input_size
        out["source"] = self.source
        return out

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """Paths, bytes, PIL images or uint8 arrays -> float32 [N, D], L2-normalised."""
        from serving.client import EmbeddingError
        try:
            return self.client.embed(list(images), batch_size=batch_size)
        except EmbeddingError as e:
            raise EncoderError(str(e)) from None

    def close(self):
        self.client.close()


def open_encoder(model: str | None = None, server: str | None = None, model_name: str = DEFAULT_MODEL_NAME,
                 threads: int = 0) -> Encoder:
    """`model`: an ONNX file, run in process; `server`: grpc://host:port or http://host:port."""
    from serving.client import EmbeddingClient, EmbeddingError
    if bool(model) == bool(server):
        raise EncoderError("give the encoder as either --model model.onnx or --server grpc://host:port")
    target = str(model or server)
    if model and not Path(model).is_file():
        raise EncoderError(f"no ONNX model at {model} (export one with python -m export.onnx)")
    try:
        client = EmbeddingClient(target, model=model_name, device="cpu", threads=threads) if model else \
            EmbeddingClient(target, model=model_name, retries=1)
    except (EmbeddingError, ValueError) as e:
        raise EncoderError(str(e)) from None
    return Encoder(client, str(Path(model).resolve()) if model else target)


def source_of(collection, spec: str) -> dict:
    """How an index finds a collection's images again: {"kind": folder|zip|torchvision, "path": ...};
    `spec` is what the collection was opened from."""
    from trainer.data import FolderCollection, TorchvisionCollection, ZipCollection
    if isinstance(collection, FolderCollection):
        return {"kind": "folder", "path": str(Path(collection.root).resolve())}
    if isinstance(collection, ZipCollection):
        return {"kind": "zip", "path": str(Path(collection.path).resolve())}
    if isinstance(collection, TorchvisionCollection):
        return {"kind": "torchvision", "path": str(spec)}
    raise TypeError(f"unknown image collection {type(collection).__name__}")


@dataclass
class Embedded:
    vectors: np.ndarray
    items: list                                      # [{"name", "label"}] of the embedded images
    skipped: list = field(default_factory=list)      # [(name, reason)] of unreadable images


def embed_collection(encoder: Encoder, collection, *, indices=None, batch_size: int = 64, workers: int = 2,
                     progress: bool = True, desc: str = "embedding") -> Embedded:
    """Every readable image of `collection` (or those at `indices`) -> vectors and item records."""
    from tqdm import tqdm
    pre = encoder.preprocessing
    order = list(range(len(collection)) if indices is None else indices)
    classes = list(getattr(collection, "classes", []) or [])
    labels = getattr(collection, "labels", None)

    def load(i):
        try:
            return i, pre.resize_and_crop(collection.load(i)), None
        except ImageDecodeError as e:
            return i, None, str(e)

    vectors, items, skipped = [], [], []
    bar = tqdm(total=len(order), desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(order), batch_size):
            pixels, batch_items = [], []
            for i, hwc, error in pool.map(load, order[start:start + batch_size]):
                if hwc is None:
                    skipped.append((collection.name(i), error))
                    continue
                label = labels[i] if labels is not None else None
                pixels.append(hwc)
                batch_items.append({"name": collection.name(i),
                                    "label": classes[label] if label is not None and 0 <= label < len(classes)
                                    else None})
            if pixels:
                vectors.append(encoder.embed(np.stack(pixels), batch_size=batch_size))
                items.extend(batch_items)
            bar.update(min(batch_size, len(order) - start))
    bar.close()
    dim = encoder.embedding_dim
    return Embedded(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32), items, skipped)
