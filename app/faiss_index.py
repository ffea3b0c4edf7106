"""A similarity index over image embeddings: FAISS for the search, a small manifest for the rest.

Similarity is cosine: every vector is L2-normalised on the way in and searched by inner product.
Three index kinds, chosen by size unless asked for by name:

  flat    exact search (faiss.IndexFlatIP), for collections up to AUTO_EXACT_MAX vectors;
  hnsw    approximate: an HNSW graph over the full vectors, up to AUTO_HNSW_MAX vectors;
  ivfpq   approximate: an inverted file of product-quantised codes (a few dozen bytes a vector
          in memory), whose candidates are re-ranked exactly against the stored vectors.

An approximate index is tuned when it is built: its search breadth (efSearch for HNSW, nprobe for
IVF-PQ) is raised until recall@10 against exact search reaches the target (0.95 unless told
otherwise) with 95% confidence, measured with a sample of the collection (up to 1,000 vectors) held out of the index
while it is tuned, so that the queries are as new to it as an unseen photo would be; the manifest
records what was measured. Adding a batch of images re-tunes with the new vectors as the queries.

On disk an index is a directory:

  index.json             the manifest: model identity (fingerprint, embedding size), index kind,
                         parameters and measured recall, image sources, count, file names
  vectors-<gen>.npy      the normalised embeddings, float32 [N, D] (the source of truth: re-ranking,
                         rebuilds and recall measurements read it, memory-mapped)
  index-<gen>.faiss      the FAISS index over them
  items-<gen>.jsonl      one line per vector: {"source": i, "name": path or archive member, "label": class}

  index.lock             the writers' lock (see below); its content is the last writer's pid

Every save writes a new generation of the data files, then replaces index.json atomically, then
removes the previous generation: a reader, or a crash at any point, sees the old index or the new
one, never a mix. One writer at a time: every change (build, add, save) holds an exclusive lock on
index.lock (flock, across processes) for its whole read-modify-write, re-reads the index first if
another writer saved a newer generation meanwhile (`SearchIndex.writing`), and `save` refuses to
write over a generation newer than the one it was loaded from. Files of a generation left by a
crashed save are removed on the next load (under the lock).

Vectors from a different model are refused (fingerprint and embedding size are checked), since
distances between two models' embeddings mean nothing.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST_NAME = "index.json"
LOCK_NAME = "index.lock"
INDEX_FORMAT = "byolkit-index/1"
KINDS = ("auto", "flat", "hnsw", "ivfpq")
AUTO_EXACT_MAX = 50_000       # up to here exact search answers a query in tens of milliseconds on a CPU
AUTO_HNSW_MAX = 500_000       # beyond, IVF-PQ: at 1M x 512 it was faster at recall 0.95 and 29x smaller
                              # than HNSW (BENCHMARKS.md), whose graph keeps every vector in RAM
DEFAULT_TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 1000
MIN_TUNING_QUERIES = 50
HNSW_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
IVF_NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)


class SearchIndexError(ValueError):
    """An index that cannot be used as asked (missing, corrupt, wrong shape)."""


class ModelMismatchError(SearchIndexError):
    """Embeddings from a model other than the one the index was built with."""


class IndexBusyError(SearchIndexError):
    """Another process (or thread) is changing the index right now."""


# ----------------------------------------------------------------------------------------------
# One writer at a time
# ----------------------------------------------------------------------------------------------
_HELD = threading.local()  # per thread: {lock path: depth}, so that a writer may re-enter its own lock


@contextmanager
def index_lock(directory, wait: bool = False, on_wait=None):
    """Hold the writers' lock of the index in `directory` (which must exist).

    An exclusive flock on directory/index.lock, so it holds across processes and is released by the
    kernel if the holder dies. Re-entrant within a thread; another thread or process gets
    IndexBusyError at once, or with `wait` blocks until the holder is done (`on_wait(message)` is
    told first)."""
    import fcntl
    path = Path(directory) / LOCK_NAME
    key = str(path.resolve())
    held = _HELD.__dict__.setdefault("depth", {})
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise IndexBusyError(f"another process (pid {holder}) is changing the index at {directory}; "
                                     "try again when it has finished (the command line waits with --wait)") from None
            if on_wait:
                on_wait(f"waiting for another process (pid {holder}) to finish changing the index at {directory}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(fd)  # releases the lock


def normalize(vectors) -> np.ndarray:
    """float32 [N, D], each row scaled to unit length (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, copy=True, ndmin=2)
    if x.ndim != 2:
        raise SearchIndexError(f"expected vectors of shape [N, D], got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def auto_kind(n: int) -> str:
    return "flat" if n <= AUTO_EXACT_MAX else "hnsw" if n <= AUTO_HNSW_MAX else "ivfpq"


def _faiss():
    import faiss
    return faiss


# ----------------------------------------------------------------------------------------------
# Building the FAISS part
# ----------------------------------------------------------------------------------------------
def default_params(kind: str, n: int, dim: int) -> dict:
    """Parameters of a `kind` index for `n` vectors of `dim` dimensions (search breadths get tuned later)."""
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 64}
    if kind == "ivfpq":
        # about 4 sqrt(n) lists, a power of two, each trained on at least 39 points
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1)))))
        nlist = int(max(1, min(nlist, 65536, n // 39)))
        # one byte per 8 dimensions (64 bytes for 512-d; FAISS trains sub-quantisers of fewer than 8
        # dimensions far more slowly); fewer bits per code on small sets
        m = next((c for c in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2) if dim % c == 0 and dim // c >= 8), 1)
        nbits = next((b for b in (8, 6, 4, 3, 2) if n >= 39 * 2 ** b), 1)
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(16, nlist), "refine": 10}
    return {}


def make_faiss_index(kind: str, dim: int, params: dict, train_vectors: np.ndarray | None = None, seed: int = 0):
    """An empty FAISS index of `kind` (IVF-PQ trained on a sample of `train_vectors`)."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = int(params["efConstruction"])
        graph.hnsw.efSearch = int(params["efSearch"])
        # ids are positions: vectors may join out of order (see tuning); the faiss wrapper keeps
        # `graph` referenced from the map, and the map does not own it (no double free)
        return faiss.IndexIDMap(graph)
    if kind == "ivfpq":
        if train_vectors is None or len(train_vectors) == 0:
            raise SearchIndexError("an IVF-PQ index needs vectors to train on")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                                 faiss.METRIC_INNER_PRODUCT)
        budget = max(40 * int(params["nlist"]), 40 * 2 ** int(params["nbits"]), 20_000)
        rng = np.random.default_rng(seed)
        sample = train_vectors if len(train_vectors) <= budget else \
            train_vectors[np.sort(rng.choice(len(train_vectors), budget, replace=False))]
        index.cp.seed, index.cp.niter, index.pq.cp.seed, index.pq.cp.niter = seed, 10, seed, 15
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = int(params["nprobe"])
        return index
    raise SearchIndexError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")


def _add_in_chunks(index, vectors: np.ndarray, ids: np.ndarray | None = None, chunk: int = 100_000) -> None:
    """Add `vectors` (all of them; with `ids`, vectors[ids] under those ids) a chunk at a time."""
    total = len(vectors) if ids is None else len(ids)
    for start in range(0, total, chunk):
        if ids is None:
            index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))
        else:
            rows = np.ascontiguousarray(ids[start:start + chunk], dtype=np.int64)
            index.add_with_ids(np.ascontiguousarray(vectors[rows], dtype=np.float32), rows)


def _search_id_mapped(index, queries: np.ndarray, k: int, cache: dict, efSearch: int):
    """Search an IndexIDMap through its inner index and map the ids in numpy.

    FAISS's own IndexIDMap.search maps ids in an OpenMP parallel loop even for one query; on a
    busy two-core machine waking the second thread cost 8-12 ms a query against 0.05 ms for the
    search itself. `cache` keeps the inner index and the id map (cleared whenever ids are added).
    """
    faiss = _faiss()
    if "inner" not in cache:
        cache["inner"] = faiss.downcast_index(index.index)
        cache["ids"] = faiss.vector_to_array(index.id_map).astype(np.int64)
    cache["inner"].hnsw.efSearch = efSearch
    scores, internal = cache["inner"].search(queries, k)
    return scores, np.where(internal >= 0, cache["ids"][np.maximum(internal, 0)], -1)


def _holdout(n: int, seed: int) -> np.ndarray:
    """Positions of the vectors held out to tune an approximate index: a tenth, at most
    RECALL_QUERIES, none when that is under MIN_TUNING_QUERIES."""
    size = min(RECALL_QUERIES, n // 10)
    if size < MIN_TUNING_QUERIES:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _exact_excluding(queries: np.ndarray, vectors: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of each query among `vectors` without the rows in `excluded` (sorted)."""
    extra = min(len(excluded), 32)
    _, ids = exact_neighbours(queries, vectors, k + extra)
    out = np.full((len(ids), k), -1, np.int64)
    for r, row in enumerate(ids):
        kept = row[~np.isin(row, excluded)][:k]
        out[r, :len(kept)] = kept
    return out


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 200_000):
    """Exact top-k by inner product -> (scores [Q, k], ids [Q, k]), over a possibly memory-mapped base."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        s, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def recall_per_query(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """|found[:k] & truth[:k]| / k for each query (ids < 0 never count)."""
    return np.array([len({int(a) for a in f[:k] if a >= 0} & {int(b) for b in t[:k]}) / k
                     for f, t in zip(found, truth)], dtype=np.float64)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:k] & truth[:k]| / k over the queries (ids < 0 never count)."""
    r = recall_per_query(found, truth, k)
    return float(r.mean()) if len(r) else 1.0


def lower_bound(r: np.ndarray, z: float = 1.645) -> float:
    """One-sided 95% lower confidence bound of the mean of per-query recalls."""
    if len(r) < 2:
        return float(r.mean()) if len(r) else 1.0
    return float(r.mean() - z * r.std(ddof=1) / np.sqrt(len(r)))


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without its query's own id, cut to k (padded with -1)."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, me) in enumerate(zip(ids, self_ids)):
        kept = [int(v) for v in row if v != me and v >= 0][:k]
        out[r, :len(kept)] = kept
    return out


def _quantised_pair(index_model: dict, model: dict, images: str | None = None, out: str | None = None) -> str | None:
    """The refusal for an index and an encoder that are the float32 and int8 forms of one model, else None.

    Their embeddings differ slightly (cosine ~0.999), enough to reorder close neighbours, so an index
    holds one form's vectors only; the user rebuilds it to switch (app.index build --force)."""
    def form(m):
        return "int8" if m.get("weights") == "int8" else "float32"

    def root(m):
        return m.get("float_fingerprint") or m.get("fingerprint")

    if form(index_model) == form(model) or root(index_model) != root(model):
        return None
    return (f"this index was built with the {form(index_model)} form of model {root(index_model)} (fingerprint "
            f"{index_model.get('fingerprint')}), the encoder given is its {form(model)} form (fingerprint "
            f"{model.get('fingerprint')}): the two forms' embeddings differ slightly and are not mixed in one index. "
            "Use the index's own model file, or rebuild the index with this one: python -m app.index build "
            f"--images {images or 'IMAGES'} --out {out or 'INDEX_DIR'} --force "
            f"--model {model.get('source') or 'MODEL.onnx'}")


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchIndex:
    """Normalised vectors, their FAISS index, what each vector is, and which model made them."""

    dim: int
    model: dict                                    # fingerprint, embedding_dim, arch, ... of the encoder
    kind: str = "flat"
    requested: str = "auto"
    params: dict = field(default_factory=dict)
    recall: dict | None = None                     # {"k", "value", "queries", "target"} for approximate kinds
    sources: list = field(default_factory=list)    # [{"kind": "folder"|"zip"|..., "path": ...}]
    items: list = field(default_factory=list)      # [{"source": i, "name": ..., "label": ...}]
    skipped: int = 0                               # unreadable images met while building and adding
    unreadable: list = field(default_factory=list)  # [{"source", "name", "reason"}] of those still unreadable
    created: str = ""
    updated: str = ""
    vectors: np.ndarray | None = None
    faiss_index: object = None
    path: Path | None = None
    target_recall: float = DEFAULT_TARGET_RECALL
    build_seconds: float = 0.0
    tune_seconds: float = 0.0
    generation: int = 0                            # of the files on disk this copy was loaded from or saved as
    _cache: dict = field(default_factory=dict, repr=False)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors, items=None, *, model: dict, kind: str = "auto", params: dict | None = None,
              sources=None, skipped: int = 0, target_recall: float = DEFAULT_TARGET_RECALL,
              tune: bool = True, seed: int = 0, progress=None) -> SearchIndex:
        """A new index over `vectors` (normalised here) made by `model` (needs "fingerprint")."""
        x = normalize(vectors)
        if len(x) == 0:
            raise SearchIndexError("no vectors to index (no readable images?)")
        if "fingerprint" not in model:
            raise SearchIndexError("the model's metadata lacks a fingerprint")
        dim = int(x.shape[1])
        if int(model.get("embedding_dim", dim)) != dim:
            raise ModelMismatchError(f"vectors have {dim} dimensions but the model says embedding_dim="
                                     f"{model.get('embedding_dim')}")
        if kind not in KINDS:
            raise SearchIndexError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
        now = _now()
        index = cls(dim=dim, model=dict(model), requested=kind, sources=list(sources or []),
                    items=_check_items(items, len(x)), skipped=int(skipped), created=now, updated=now,
                    target_recall=float(target_recall))
        index._build_faiss(x, params=params, tune=tune, seed=seed, progress=progress)
        return index

    def _build_faiss(self, x: np.ndarray, *, params: dict | None = None, tune: bool = True, seed: int = 0,
                     progress=None) -> None:
        """(Re)build the FAISS part over all of `x` (whose row i is item i).

        For an approximate kind, a random sample of the vectors is held out, the index is built
        over the rest, the search breadth is tuned with the sample as queries (they are not in the
        index yet, as a new photo would not be), and then the sample is added too.
        """
        kind = auto_kind(len(x)) if self.requested == "auto" else self.requested
        started = time.perf_counter()
        p = {**default_params(kind, len(x), self.dim), **(params or {})}
        if progress:
            progress(f"building a {kind} index over {len(x)} vectors")
        index = make_faiss_index(kind, self.dim, p, train_vectors=x, seed=seed)
        self.kind, self.params, self.vectors, self.faiss_index, self.recall = kind, p, x, index, None
        self._cache = {}
        held = _holdout(len(x), seed) if kind != "flat" and tune else np.zeros(0, np.int64)
        if kind == "flat":
            _add_in_chunks(index, x)
        else:
            rest = np.setdiff1d(np.arange(len(x)), held, assume_unique=True)
            _add_in_chunks(index, x, ids=rest)
            self._cache = {}
        self.build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if kind != "flat":
            if len(held):
                if progress:
                    progress(f"tuning the search breadth for recall@{RECALL_K} >= {self.target_recall}")
                truth = _exact_excluding(x[held], x, held, RECALL_K)
                self._tune(x[held], truth)
                _add_in_chunks(index, x, ids=held)
                self._cache = {}
            else:
                self._widest()
        self.tune_seconds = time.perf_counter() - started

    def _breadth_key(self) -> tuple[str, tuple]:
        if self.kind == "hnsw":
            return "efSearch", HNSW_EF_LADDER
        nlist = int(self.params["nlist"])
        return "nprobe", tuple(v for v in IVF_NPROBE_LADDER if v < nlist) + (nlist,)

    def _tune(self, queries: np.ndarray, truth: np.ndarray) -> dict:
        """The smallest search breadth whose recall@10 on `queries` (not in the index) against
        `truth` (their exact neighbours) reaches the target with 95% confidence (the one-sided
        lower bound of the mean over the queries, so that new queries reach it too, not just this
        sample); the widest tried if none does."""
        key, ladder = self._breadth_key()
        r = np.zeros(0)
        for setting in ladder:
            self.params[key] = int(setting)
            r = recall_per_query(self.search(queries, RECALL_K)[1], truth, RECALL_K)
            if lower_bound(r) >= self.target_recall:
                break
        self.recall = {"k": RECALL_K, "value": round(float(r.mean()), 4), "lower_95": round(lower_bound(r), 4),
                       "queries": len(queries), "target": self.target_recall, "held_out": True}
        return self.recall

    def _widest(self) -> None:
        """Too few vectors to measure recall on: search as widely as the kind allows."""
        key, ladder = self._breadth_key()
        self.params[key] = max(ladder[-1], len(self)) if key == "efSearch" else ladder[-1]
        self.recall = {"k": RECALL_K, "value": None, "queries": 0, "target": self.target_recall, "held_out": True}

    # -- model guard ---------------------------------------------------------------------------
    def check_model(self, model: dict) -> None:
        """Refuse embeddings from any model but the index's own."""
        mine, theirs = self.model.get("fingerprint"), (model or {}).get("fingerprint")
        forms = _quantised_pair(self.model, model or {}, self.sources[0]["path"] if self.sources else None,
                                self.path) if theirs != mine else None
        if forms:
            raise ModelMismatchError(forms)
        if theirs != mine:
            raise ModelMismatchError(
                f"this index was built with model fingerprint {mine} ({_describe(self.model)}), but the encoder "
                f"given has fingerprint {theirs} ({_describe(model or {})}): embeddings of different models "
                "cannot be compared. Use the model the index was built with, or build a new index with this one.")
        dim = model.get("embedding_dim")
        if dim is not None and int(dim) != self.dim:
            raise ModelMismatchError(f"the encoder gives {dim}-dimensional embeddings, this index holds {self.dim}")

    # -- adding --------------------------------------------------------------------------------
    def add(self, vectors, items=None, *, model: dict, skipped: int = 0, progress=None) -> int:
        """Append vectors made by `model` -> the number added. An automatically chosen kind is
        re-chosen as the collection grows; an approximate index is re-tuned with the new vectors as
        queries before they join it (when there are enough of them to measure recall on)."""
        self.check_model(model)
        x = normalize(vectors)
        if len(x) and x.shape[1] != self.dim:
            raise ModelMismatchError(f"vectors have {x.shape[1]} dimensions, this index holds {self.dim}")
        new_items = _check_items(items, len(x), start=len(self))
        self.skipped += int(skipped)
        if len(x) == 0:
            return 0
        old = len(self)
        merged = np.concatenate([np.asarray(self.vectors, np.float32), x])
        self.items.extend(new_items)
        self.updated = _now()
        if self.requested == "auto" and auto_kind(len(merged)) != self.kind:
            self._build_faiss(merged, progress=progress)  # grown out of its kind: rebuild
            return len(x)
        if self.kind != "flat" and len(x) >= MIN_TUNING_QUERIES:
            sample = np.sort(np.random.default_rng(len(merged)).choice(len(x), min(len(x), RECALL_QUERIES),
                                                                         replace=False))
            truth = exact_neighbours(x[sample], self.vectors, RECALL_K)[1]
            self._tune(x[sample], truth)
        self.vectors = merged
        self._cache = {}
        if self.kind == "flat":
            _add_in_chunks(self.faiss_index, x)
        else:  # approximate kinds map FAISS ids to positions explicitly
            _add_in_chunks(self.faiss_index, merged, ids=np.arange(old, len(merged)))
        return len(x)

    def record_unreadable(self, source: int, attempted, skipped) -> None:
        """After trying the images named `attempted` of `source`: those in `skipped` [(name, reason)]
        are (still) unreadable, the others no longer are. `skipped` counts the unreadable ones."""
        attempted = set(attempted)
        self.unreadable = [u for u in self.unreadable if not (u["source"] == source and u["name"] in attempted)]
        self.unreadable += [{"source": source, "name": name, "reason": reason} for name, reason in skipped]
        self.skipped = len(self.unreadable)

    def add_source(self, kind: str, path: str) -> int:
        """The index of an image source (folder, zip archive, upload...), registered once."""
        entry = {"kind": kind, "path": str(path)}
        if entry not in self.sources:
            self.sources.append(entry)
        return self.sources.index(entry)

    def present(self, source: int, names) -> set:
        """Those of `names` (of image source `source`) already in the index."""
        return {it["name"] for it in self.items if it["source"] == source} & set(names)

    # -- searching -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self.vectors is None else len(self.vectors)

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids [Q, k] of each query's nearest neighbours (id -1: none)."""
        q = normalize(queries)
        if q.shape[1] != self.dim:
            raise ModelMismatchError(f"queries have {q.shape[1]} dimensions, this index holds {self.dim}")
        k = int(k)
        if k < 1:
            raise SearchIndexError("k must be at least 1")
        kk = min(k, len(self))
        if self.kind == "hnsw":
            ef = max(int(self.params["efSearch"]), kk)
            scores, ids = _search_id_mapped(self.faiss_index, q, kk, self._cache, efSearch=ef)
        elif self.kind == "ivfpq":
            self.faiss_index.nprobe = int(self.params["nprobe"])
            rf = max(1, int(self.params.get("refine", 1)))
            _, cand = self.faiss_index.search(q, min(kk * rf, len(self)))
            scores, ids = self._rerank(q, cand, kk)
        else:
            scores, ids = self.faiss_index.search(q, kk)
        if kk < k:
            pad = ((0, 0), (0, k - kk))
            scores, ids = np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)
        return scores, ids

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int):
        """Exact inner products of the candidates (read from the stored vectors) -> best k."""
        valid = cand >= 0
        rows = np.where(valid, cand, 0)
        flat = np.unique(rows)  # sorted: each distinct row read once from the (memory-mapped) vectors
        block = np.asarray(self.vectors[flat], dtype=np.float32)
        pos = np.searchsorted(flat, rows)
        sims = np.einsum("qcd,qd->qc", block[pos], q)
        sims[~valid] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(np.where(valid, cand, -1), order, 1)
        return np.take_along_axis(sims, order, 1).astype(np.float32), ids

    def neighbours(self, query, k: int = 10) -> list[dict]:
        """One query vector -> [{"rank", "id", "score", "name", "label", "source"}] best first."""
        scores, ids = self.search(np.asarray(query, np.float32).reshape(1, -1), k)
        out = []
        for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1):
            if i < 0:
                continue
            item = self.items[int(i)]
            out.append({"rank": rank, "id": int(i), "score": float(s), **item})
        return out

    # -- recall ----------------------------------------------------------------------------------
    def measure_recall(self, queries=None, n_queries: int = RECALL_QUERIES, seed: int = 0) -> float:
        """recall@10 against exact search over the stored vectors.

        `queries`: vectors not in the index (the honest measure, as for a new photo). Without them,
        sampled members query the rest, which flatters a graph index (a member is linked to its
        neighbours); the figure kept in the manifest is the held-out one measured when built."""
        if queries is not None:
            q = normalize(queries)
            truth = exact_neighbours(q, self.vectors, RECALL_K)[1]
            return recall_at_k(self.search(q, RECALL_K)[1], truth, RECALL_K) if self.kind != "flat" else 1.0
        if self.kind == "flat":
            return 1.0
        ids = np.sort(np.random.default_rng(seed).choice(len(self), min(n_queries, len(self)), replace=False))
        q = np.asarray(self.vectors[ids], np.float32)
        truth = _drop_self(exact_neighbours(q, self.vectors, RECALL_K + 1)[1], ids, RECALL_K)
        found = _drop_self(self.search(q, RECALL_K + 1)[1], ids, RECALL_K)
        return recall_at_k(found, truth, RECALL_K)

    # -- images ------------------------------------------------------------------------------------
    def image_location(self, i: int) -> tuple[dict, str]:
        """(source, name) of item `i`; a relative folder path is relative to the index directory."""
        item = self.items[i]
        source = dict(self.sources[item["source"]]) if self.sources else {"kind": "unknown", "path": ""}
        if source["kind"] == "folder" and self.path is not None and not Path(source["path"]).is_absolute():
            source["path"] = str(self.path / source["path"])
        return source, item["name"]

    def image_path(self, i: int) -> str:
        """Where item `i` lives, for people: a file path, archive.zip:member, or dataset:split#n."""
        source, name = self.image_location(i)
        if source["kind"] == "folder":
            return str(Path(source["path"]) / name)
        if source["kind"] == "webdataset":  # the name is the tar shard's path and the member's
            return name
        return f"{source['path']}:{name}" if source["kind"] == "zip" else f"{source['path']}#{name}"

    def load_image(self, i: int, reduce_to: int | None = None):
        """The indexed image `i` as an RGB PIL image (raises ImageDecodeError when it is gone); reduce_to:
        a JPEG is decoded at a fraction of its size, both sides at least this long (load_rgb)."""
        from contract.preprocess import ImageDecodeError, load_rgb
        source, name = self.image_location(i)
        if source["kind"] == "zip":
            import zipfile
            try:
                with zipfile.ZipFile(source["path"]) as zf:
                    data = zf.read(name)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise ImageDecodeError(f"cannot read {name} from {source['path']}: {e}") from None
            return load_rgb(data, reduce_to=reduce_to)
        if source["kind"] == "webdataset":
            from .embed import read_tar_source
            return load_rgb(read_tar_source(name), reduce_to=reduce_to)
        if source["kind"] == "torchvision":
            from trainer.data import DataError, open_collection
            try:
                collection = self._cache.get(("collection", source["path"])) or open_collection(source["path"])
            except DataError as e:
                raise ImageDecodeError(str(e)) from None
            self._cache[("collection", source["path"])] = collection
            return collection.load(int(name))
        return load_rgb(Path(source["path"]) / name, reduce_to=reduce_to)

    def describe_item(self, i: int) -> str:
        item = self.items[i]
        return f"{item['label']}: {item['name']}" if item.get("label") else item["name"]

    def info(self) -> dict:
        labels = sorted({it["label"] for it in self.items if it.get("label")})
        return {"count": len(self), "embedding_dim": self.dim, "kind": self.kind, "requested": self.requested,
                "params": dict(self.params), "recall": self.recall, "model": dict(self.model),
                "sources": list(self.sources), "labels": labels, "skipped": self.skipped,
                "created": self.created, "updated": self.updated, "path": str(self.path) if self.path else None}

    # -- disk ----------------------------------------------------------------------------------------
    @contextmanager
    def writing(self, wait: bool = False, on_wait=None):
        """Hold the index's writers' lock for a read-modify-write, this copy brought up to the newest
        generation on disk first (another process may have saved since it was loaded)."""
        if self.path is None:
            raise SearchIndexError("this index has not been saved anywhere")
        with index_lock(self.path, wait=wait, on_wait=on_wait):
            if int(_read_manifest(self.path)["generation"]) != self.generation:
                self.__dict__.update(SearchIndex.load(self.path).__dict__)
            yield self

    def save(self, directory, prewritten: dict | None = None) -> Path:
        """Write a new generation of the files, then switch index.json to it atomically (under the
        writers' lock; refused when the directory holds a newer generation than this copy's).
        `prewritten`: {"vectors": name, "items": name} of this generation's data files, already written
        into `directory` shard by shard (app.shards, which holds the lock meanwhile): kept as they are."""
        from trainer.checkpoint import atomic_write
        faiss = _faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with index_lock(directory):
            old = _read_manifest(directory) if (directory / MANIFEST_NAME).exists() else None
            if old and self.path is not None and _same_dir(self.path, directory) \
                    and int(old["generation"]) != self.generation:
                raise SearchIndexError(f"the index at {directory} was changed by another process since this copy was "
                                       f"loaded (generation {self.generation}, now {old['generation']}); load it "
                                       "again and repeat the change")
            generation = int(old["generation"]) + 1 if old else 1
            while not prewritten and any((directory / f"{stem}-{generation}{ext}").exists()
                                         for stem, ext in _FILES.values()):
                generation += 1  # leftovers of an interrupted save: never write over files we did not commit
            if prewritten:
                generation = int(prewritten["vectors"].rsplit("-", 1)[1].split(".")[0])
            files = {key: f"{stem}-{generation}{ext}" for key, (stem, ext) in _FILES.items()}
            if not prewritten:
                with open(directory / files["vectors"], "wb") as f:
                    np.save(f, np.asarray(self.vectors, np.float32))
                    f.flush()
                    os.fsync(f.fileno())
                with open(directory / files["items"], "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in self.items)
                    f.flush()
                    os.fsync(f.fileno())
            faiss.write_index(self.faiss_index, str(directory / files["index"]))
            _fsync_path(directory / files["index"])
            manifest = {"format": INDEX_FORMAT, "generation": generation, "files": files, "count": len(self),
                        "embedding_dim": self.dim, "metric": "cosine", "model": self.model,
                        "index": {"kind": self.kind, "requested": self.requested, "params": self.params,
                                  "recall": self.recall, "target_recall": self.target_recall,
                                  "build_seconds": round(self.build_seconds, 3),
                                  "tune_seconds": round(self.tune_seconds, 3)},
                        "sources": self.sources, "skipped": self.skipped, "unreadable": self.unreadable,
                        "created": self.created,
                        "updated": self.updated, "byolkit_version": _version()}
            atomic_write(directory / MANIFEST_NAME,
                         lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8"))
            _remove_stale(directory, files)  # the previous generation and any interrupted one
        self.path, self.generation = directory, generation
        return directory

    @classmethod
    def load(cls, directory, mmap: bool = True) -> SearchIndex:
        """The index saved in `directory`. Files of an interrupted save are removed (when no writer
        is at work); a save that lands while this reads is followed to its new generation."""
        directory = Path(directory)
        for attempt in range(5):
            m = _read_manifest(directory)
            try:
                out = cls._open(directory, m, mmap)
                break
            except FileNotFoundError as e:  # a writer replaced the generation between the two reads?
                if attempt == 4 or _read_manifest(directory)["generation"] == m["generation"]:
                    raise SearchIndexError(f"the index in {directory} is damaged (missing {Path(e.filename).name})")
        try:
            with index_lock(directory):
                _remove_stale(directory, _read_manifest(directory)["files"])
        except (IndexBusyError, OSError):
            pass  # a writer at work (its new files are not stale), or a read-only index
        return out

    @classmethod
    def _open(cls, directory: Path, m: dict, mmap: bool) -> SearchIndex:
        faiss = _faiss()
        files = m["files"]
        try:
            vectors = np.load(directory / files["vectors"], mmap_mode="r" if mmap else None)
            index = faiss.read_index(str(directory / files["index"]))
            with open(directory / files["items"], encoding="utf-8") as f:
                items = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            if not (directory / files["index"]).exists():  # faiss reports a missing file as a RuntimeError
                raise FileNotFoundError(2, "missing", str(directory / files["index"])) from None
            raise SearchIndexError(f"the index in {directory} is damaged ({type(e).__name__}: {e})") from None
        if not (len(vectors) == index.ntotal == len(items) == int(m["count"])):
            raise SearchIndexError(f"the index in {directory} is inconsistent: {len(vectors)} vectors, {index.ntotal} "
                                   f"indexed, {len(items)} items, manifest says {m['count']}")
        ix = m["index"]
        try:
            return cls(dim=int(m["embedding_dim"]), model=m["model"], kind=ix["kind"], requested=ix["requested"],
                       params=dict(ix["params"]), recall=ix.get("recall"), sources=m["sources"], items=items,
                       skipped=int(m.get("skipped", 0)), unreadable=list(m.get("unreadable", [])),
                       created=m.get("created", ""), updated=m.get("updated", ""),
                       vectors=vectors, faiss_index=index, path=directory,
                       target_recall=float(ix.get("target_recall", DEFAULT_TARGET_RECALL)),
                       build_seconds=float(ix.get("build_seconds", 0.0)),
                       tune_seconds=float(ix.get("tune_seconds", 0.0)),
                       generation=int(m["generation"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SearchIndexError(f"{directory / MANIFEST_NAME} is damaged or was edited by hand ({type(e).__name__}: "
                                   f"{e}); rebuild the index with `python -m app.index build --force`") from None


_FILES = {"vectors": ("vectors", ".npy"), "index": ("index", ".faiss"), "items": ("items", ".jsonl")}


def _is_ours(name: str) -> bool:
    return bool(re.fullmatch(r"(vectors-\d+\.npy|index-\d+\.faiss|items-\d+\.jsonl|\.index\.json\..*\.tmp)", name))


def _remove_stale(directory: Path, files: dict) -> None:
    """Remove every data file of ours but the generation `files` (call with the writers' lock held)."""
    keep = set(files.values()) | {MANIFEST_NAME}
    for p in directory.iterdir():
        if p.name not in keep and _is_ours(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def is_index_dir(directory) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"holds no {MANIFEST_NAME}"
        raise SearchIndexError(f"no index at {directory} ({what}); build one with `python -m app.index build`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path} is not a byolkit index manifest "
                               f"(format={m.get('format') if isinstance(m, dict) else None!r})")
    problem = _manifest_problem(m)
    if problem:
        raise SearchIndexError(f"{path} is damaged or was edited by hand ({problem}); rebuild the index with "
                               "`python -m app.index build --force`")
    return m


# what a manifest must hold (the rest has defaults): key -> type, and inside "files" and "index"
_MANIFEST_KEYS = {"generation": int, "files": dict, "count": int, "embedding_dim": int, "model": dict,
                  "index": dict, "sources": list}
_MANIFEST_INDEX_KEYS = {"kind": str, "requested": str, "params": dict}


def _manifest_problem(m: dict) -> str | None:
    for where, keys, d in (("", _MANIFEST_KEYS, m), ("index.", _MANIFEST_INDEX_KEYS, m.get("index"))):
        for key, kind in keys.items():
            if key not in d:
                return f'no "{where}{key}"'
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                return f'"{where}{key}" is not a{"n" * (kind is int)} {kind.__name__}'
    for key, (stem, ext) in _FILES.items():  # plain names of this directory's own files, nothing else
        if not re.fullmatch(rf"{stem}-\d+{re.escape(ext)}", str(m["files"].get(key))):
            return f'"files.{key}" is not a {stem}-N{ext} name'
    return None


def _check_items(items, n: int, start: int = 0) -> list:
    if items is None:
        return [{"source": 0, "name": str(start + i), "label": None} for i in range(n)]
    items = [dict(it) for it in items]
    if len(items) != n:
        raise SearchIndexError(f"{n} vectors but {len(items)} item descriptions")
    for it in items:
        it.setdefault("source", 0)
        it.setdefault("label", None)
        if "name" not in it:
            raise SearchIndexError("every item needs a name")
    return items


def _describe(model: dict) -> str:
    parts = [str(model[k]) for k in ("arch", "stem") if model.get(k)]
    if model.get("embedding_dim"):
        parts.append(f"{model['embedding_dim']}-d")
    if model.get("source"):
        parts.append(f"from {model['source']}")
    return ", ".join(parts) or "unknown model"


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version() -> str:
    from trainer import __version__
    return __version__
