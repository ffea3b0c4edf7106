"""The similarity index in Qdrant: a server (search sharded and replicated across machines) or its
local mode (a folder, for tests and laptops).

One collection per index, named after the index directory, with cosine distance. Each image is a
point whose id is derived from where the image is (so adding it twice changes nothing) and whose
payload is its `source` (a file path or archive:member), `label`, and the index's own source
number and name for it. The collection's metadata holds what index.json holds for a FAISS index:
the model's identity (checked exactly as SearchIndex.check_model does), the image sources and the
unreadable images. The index directory keeps only the images uploaded from the page.

Qdrant's local mode searches by brute force in numpy: right for tests, says nothing of a server's
speed (HNSW, quantisation, shards).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import numpy as np

from .faiss_index import ModelMismatchError, SearchIndex, SearchIndexError, normalize

META_KEY = "byolkit"
FORMAT = "byolkit-qdrant/1"
UPSERT_BATCH = 256
_NAMESPACE = uuid.UUID("5b1d5cf6-4a1e-4f39-9a43-6c1f0f1e8d21")


class QdrantError(SearchIndexError):
    """Qdrant unreachable, refusing, or holding something that is not a byolkit index."""


def collection_name(index_dir) -> str:
    """The collection an index directory maps to: its last path component, made safe."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(index_dir).resolve().name).strip("_")
    return name or "byolkit"


def open_client(url: str | None = None, path=None, api_key_file=None, api_key_env: str | None = None):
    """A QdrantClient: a server at `url` (API key read from a file or an environment variable named
    by the caller, never given as an argument), or local mode in the folder `path`."""
    from qdrant_client import QdrantClient
    if bool(url) == bool(path):
        raise QdrantError("give Qdrant as either --qdrant-url URL or --qdrant-path DIR")
    if url:
        key = None
        if api_key_file:
            try:
                key = Path(api_key_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise QdrantError(f"cannot read the Qdrant API key file {api_key_file}: {e.strerror or e}") from None
        elif api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise QdrantError(f"the environment variable {api_key_env} (the Qdrant API key) is not set")
        try:
            return QdrantClient(url=url, api_key=key, timeout=10, check_compatibility=False)
        except Exception as e:  # noqa: BLE001 - a malformed URL
            raise QdrantError(f"cannot use Qdrant at {url}: {e}") from None
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(path))
    except Exception as e:  # noqa: BLE001 - the folder is in use by another process
        raise QdrantError(f"cannot open Qdrant's local storage at {path}: {e}") from None


class QdrantIndex:
    """The surface of SearchIndex that the command line, ops and the page use, over a collection."""

    kind = requested = "qdrant"
    recall = None
    target_recall = 1.0

    # the item helpers of SearchIndex work unchanged over `items` (here: the points seen in results)
    image_location = SearchIndex.image_location
    image_path = SearchIndex.image_path
    load_image = SearchIndex.load_image
    describe_item = SearchIndex.describe_item
    check_model = SearchIndex.check_model
    record_unreadable = SearchIndex.record_unreadable
    add_source = SearchIndex.add_source

    def __init__(self, client, name: str, meta: dict, path, where: str):
        self.client, self.name, self.where = client, name, where
        self.model = meta["model"]
        self.dim = int(self.model["embedding_dim"])
        self.sources = list(meta.get("sources", []))
        self.unreadable = list(meta.get("unreadable", []))
        self.skipped = len(self.unreadable)
        self.labels = set(meta.get("labels", []))
        self.created, self.updated = meta.get("created", ""), meta.get("updated", "")
        self.path = Path(path) if path is not None else None  # the index directory (uploads)
        self.items: dict = {}
        self._cache: dict = {}
        self.params = {"distance": "cosine"}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, client, index_dir, model: dict, *, where: str, force: bool = False) -> QdrantIndex:
        from qdrant_client import models
        name = collection_name(index_dir)
        if "fingerprint" not in model:
            raise SearchIndexError("the model's metadata lacks a fingerprint")
        if _call(client.collection_exists, name, where=where):
            if not force:
                raise QdrantError(f"Qdrant at {where} already holds a collection {name!r}; use `add` to extend "
                                  "it, or --force to build it anew")
            _call(client.delete_collection, name, where=where)
        now = _now()
        meta = {"format": FORMAT, "model": dict(model), "sources": [], "unreadable": [], "labels": [],
                "created": now, "updated": now}
        _call(client.create_collection, name, where=where,
              vectors_config=models.VectorParams(size=int(model["embedding_dim"]), distance=models.Distance.COSINE),
              metadata={META_KEY: meta})
        Path(index_dir).mkdir(parents=True, exist_ok=True)
        return cls(client, name, meta, index_dir, where)

    @classmethod
    def open(cls, client, index_dir, *, where: str) -> QdrantIndex:
        name = collection_name(index_dir)
        if not _call(client.collection_exists, name, where=where):
            raise QdrantError(f"Qdrant at {where} holds no collection {name!r}; build it with "
                              "`python -m app.index build --backend qdrant`")
        info = _call(client.get_collection, name, where=where)
        meta = (info.config.metadata or {}).get(META_KEY)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "fingerprint" not in meta.get("model", {}):
            raise QdrantError(f"the collection {name!r} at {where} is not a byolkit index (no model fingerprint "
                              "in its metadata)")
        return cls(client, name, meta, index_dir, where)

    # -- adding ------------------------------------------------------------------------------------
    def point_id(self, src: int, name: str) -> str:
        source = self.sources[src] if src < len(self.sources) else {}
        return str(uuid.uuid5(_NAMESPACE, f"{source.get('kind')}\0{source.get('path')}\0{name}"))

    def present(self, src: int, names) -> set:
        """Those of `names` (of source `src`) already in the collection."""
        names = list(names)
        found = set()
        for lo in range(0, len(names), 1000):
            chunk = names[lo:lo + 1000]
            ids = {self.point_id(src, n): n for n in chunk}
            points = _call(self.client.retrieve, self.name, where=self.where, ids=list(ids), with_payload=False,
                           with_vectors=False)
            found |= {ids[str(p.id)] for p in points}
        return found

    def add(self, vectors, items=None, *, model: dict, skipped: int = 0, progress=None) -> int:
        from qdrant_client import models
        self.check_model(model)
        x = normalize(vectors)
        items = list(items or [])
        if len(x) and x.shape[1] != self.dim:
            raise ModelMismatchError(f"vectors have {x.shape[1]} dimensions, this index holds {self.dim}")
        if len(items) != len(x):
            raise SearchIndexError(f"{len(x)} vectors but {len(items)} item descriptions")
        for lo in range(0, len(x), UPSERT_BATCH):
            points = []
            for vec, it in zip(x[lo:lo + UPSERT_BATCH], items[lo:lo + UPSERT_BATCH]):
                src = int(it.get("source", 0))
                self.items.clear()
                self.items["_"] = {"source": src, "name": it["name"], "label": it.get("label")}
                points.append(models.PointStruct(
                    id=self.point_id(src, it["name"]), vector=vec.tolist(),
                    payload={"source": self.image_path("_"), "label": it.get("label"), "src": src,
                             "name": it["name"]}))
                if it.get("label"):
                    self.labels.add(it["label"])
            _call(self.client.upsert, self.name, where=self.where, points=points, wait=True)
        self.items.clear()
        self.skipped += int(skipped)
        self.updated = _now()
        return len(x)

    def save(self, directory=None) -> None:
        """Write the index's metadata (sources, labels, unreadable images) to the collection."""
        meta = {"format": FORMAT, "model": self.model, "sources": self.sources, "unreadable": self.unreadable,
                "labels": sorted(self.labels), "created": self.created, "updated": self.updated}
        _call(self.client.update_collection, self.name, where=self.where, metadata={META_KEY: meta})

    # -- searching ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(_call(self.client.count, self.name, where=self.where, exact=True).count)

    def neighbours(self, query, k: int = 10) -> list[dict]:
        q = normalize(np.asarray(query, np.float32).reshape(1, -1))
        if q.shape[1] != self.dim:
            raise ModelMismatchError(f"queries have {q.shape[1]} dimensions, this index holds {self.dim}")
        if int(k) < 1:
            raise SearchIndexError("k must be at least 1")
        res = _call(self.client.query_points, self.name, where=self.where, query=q[0].tolist(), limit=int(k),
                    with_payload=True)
        if len(self.items) > 10_000:
            self.items.clear()
        out = []
        for rank, p in enumerate(res.points, 1):
            item = {"source": int(p.payload.get("src", 0)), "name": p.payload.get("name", ""),
                    "label": p.payload.get("label")}
            self.items[str(p.id)] = item
            out.append({"rank": rank, "id": str(p.id), "score": float(p.score), **item})
        return out

    def sample_examples(self, folder: Path, n: int = 6) -> list[Path]:
        """A few indexed images (one per label where there are labels) copied out as example queries."""
        points, _ = _call(self.client.scroll, self.name, where=self.where, limit=200, with_payload=True)
        chosen, seen = [], set()
        for p in points:
            label = p.payload.get("label")
            if label in seen and len(seen) < n:
                continue
            seen.add(label)
            self.items[str(p.id)] = {"source": int(p.payload.get("src", 0)), "name": p.payload.get("name", ""),
                                     "label": label}
            chosen.append(str(p.id))
            if len(chosen) == n:
                break
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, pid in enumerate(chosen):
            try:
                image = self.load_image(pid)
            except ValueError:
                continue
            paths.append(folder / f"example_{i}.png")
            image.save(paths[-1])
        return paths

    def info(self) -> dict:
        return {"count": len(self), "embedding_dim": self.dim, "kind": "qdrant", "requested": "qdrant",
                "params": {"distance": "cosine"}, "recall": None, "model": dict(self.model),
                "sources": list(self.sources), "labels": sorted(self.labels), "skipped": self.skipped,
                "created": self.created, "updated": self.updated, "path": str(self.path) if self.path else None,
                "qdrant": {"at": self.where, "collection": self.name}}

    def close(self) -> None:
        self.client.close()


def _call(fn, *args, where: str, **kwargs):
    """A Qdrant call; any failure to reach or use it -> one QdrantError line."""
    try:
        return fn(*args, **kwargs)
    except SearchIndexError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, timeouts, HTTP errors, local-mode errors
        text = " ".join(str(e).split()) or type(e).__name__
        raise QdrantError(f"Qdrant at {where} failed: {text[:300]}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
