"""A FAISS index from Parquet embedding shards (python -m app.embed), one shard in memory at a time.

    python -m app.index build --embeddings EMB_DIR --out INDEX_DIR

The shards are read twice with pyarrow: the first pass writes the normalised vectors into the
index's vectors file (the re-ranking vectors, memory-mapped by every later search) and its items
file, and keeps the training sample and the held-out tuning queries; the second pass adds each
block of vectors to the FAISS index. Peak memory is one shard, the training sample and the FAISS
index itself (for IVF-PQ: its codes, m + 8 bytes a vector), never the collection's float32 vectors.
The index kind, its parameters, the held-out tuning and the manifest are the same as
`SearchIndex.build` gives for the same vectors in memory.

Why pyarrow and not embedding-reader/autofaiss: autofaiss pins faiss-cpu 1.7 and builds its own
index kinds without our held-out recall tuning or our manifest; embedding-reader reads Parquet
through pandas and fsspec to hand back numpy blocks, which pyarrow does here in a few lines.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .embed import EmbedError, open_embeddings, read_shard
from .faiss_index import (
    MANIFEST_NAME,
    RECALL_K,
    ModelMismatchError,
    SearchIndex,
    SearchIndexError,
    _holdout,
    auto_kind,
    default_params,
    index_lock,
    make_faiss_index,
    normalize,
)

BLOCK = 100_000  # vectors read back from the vectors file per FAISS add


def _naming(manifest: dict):
    """-> (sources, f(source string) -> (source index, name)) so that items match a folder build's."""
    inp = manifest["input"]
    spec = inp["spec"]
    if inp["kind"] == "collection" and Path(spec).is_dir():
        return [{"kind": "folder", "path": spec}], lambda s: (0, s[len(spec) + 1:])
    if inp["kind"] == "collection" and Path(spec).is_file():
        return [{"kind": "zip", "path": spec}], lambda s: (0, s[len(spec) + 1:])
    if inp["kind"] == "collection":
        return [{"kind": "torchvision", "path": spec}], lambda s: (0, s.rsplit("#", 1)[-1])
    if inp["kind"] == "list":
        return [{"kind": "folder", "path": "/"}], lambda s: (0, s.lstrip("/"))
    return [{"kind": "webdataset", "path": spec}], lambda s: (0, s)


def _generation(out: Path) -> int:
    from .faiss_index import _FILES, _read_manifest
    gen = int(_read_manifest(out)["generation"]) + 1 if (out / MANIFEST_NAME).is_file() else 1
    while any((out / f"{stem}-{gen}{ext}").exists() for stem, ext in _FILES.values()):
        gen += 1
    return gen


def build_from_embeddings(directory, out, *, kind: str = "auto", target_recall: float = 0.95, model: dict | None = None,
                          seed: int = 0, log=None) -> SearchIndex:
    """Index the shards in `directory` into a new index at `out` (checked by the caller: new, or --force)."""
    log = log or (lambda msg: None)
    manifest, files = open_embeddings(directory)
    mine = manifest["model"]
    if model is not None and model.get("fingerprint") != mine.get("fingerprint"):
        raise ModelMismatchError(f"the embeddings in {directory} are of model {mine.get('fingerprint')}, but the "
                                 f"encoder given has fingerprint {model.get('fingerprint')}")
    counts = [int(e["rows"]) for e in manifest["shards"]]
    n, dim = sum(counts), int(mine["embedding_dim"])
    if n == 0:
        raise SearchIndexError(f"no vectors to index in {directory} (no readable images?)")
    chosen = auto_kind(n) if kind == "auto" else kind
    params = default_params(chosen, n, dim)
    started = time.perf_counter()

    rng = np.random.default_rng(seed)
    held = _holdout(n, seed) if chosen != "flat" else np.zeros(0, np.int64)
    budget = max(40 * int(params.get("nlist", 1)), 40 * 2 ** int(params.get("nbits", 0)), 20_000)
    train_rows = np.sort(rng.choice(n, min(n, budget), replace=False)) if chosen == "ivfpq" else np.zeros(0, np.int64)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with index_lock(out):  # no load may take this generation's files for crash leftovers before save()
        gen = _generation(out)
        names = {"vectors": f"vectors-{gen}.npy", "items": f"items-{gen}.jsonl"}
        sources, name_of = _naming(manifest)
        train, held_vectors = [], []
        log(f"pass 1: {len(files)} shards, {n} vectors -> {out / names['vectors']}")
        with open(out / names["vectors"], "wb") as vf, open(out / names["items"], "w", encoding="utf-8") as itf:
            np.lib.format.write_array_header_2_0(vf, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                      "fortran_order": False, "shape": (n, dim)})
            header = vf.tell()
            pos = 0
            for path, count in zip(files, counts):
                vectors, srcs, labels = read_shard(path)
                if len(vectors) != count:
                    raise EmbedError(f"shard {path} holds {len(vectors)} rows, the manifest says {count}")
                x = normalize(vectors)
                del vectors
                vf.write(x.tobytes())
                for s, label in zip(srcs, labels):
                    src, name = name_of(s)
                    itf.write(json.dumps({"source": src, "name": name, "label": label}, ensure_ascii=False) + "\n")
                for rows, keep in ((train_rows, train), (held, held_vectors)):
                    inside = rows[(rows >= pos) & (rows < pos + count)]
                    if len(inside):
                        keep.append(x[inside - pos])
                pos += count
            for f in (vf, itf):
                f.flush()
                os.fsync(f.fileno())

        sample = np.concatenate(train) if train else None
        index_f = make_faiss_index(chosen, dim, params, train_vectors=sample, seed=seed)
        del sample, train
        log(f"pass 2: adding {n} vectors to a {chosen} index")
        is_held = np.zeros(0, bool)
        for lo, x in _blocks(out / names["vectors"], header, n, dim):
            if chosen == "flat":
                index_f.add(x)
                continue
            ids = np.arange(lo, lo + len(x), dtype=np.int64)
            is_held = np.isin(ids, held)
            index_f.add_with_ids(np.ascontiguousarray(x[~is_held]), ids[~is_held])
        ix = SearchIndex(dim=dim, model=dict(mine), kind=chosen, requested=kind, params=params, sources=sources,
                         items=[], vectors=np.load(out / names["vectors"], mmap_mode="r"), faiss_index=index_f,
                         target_recall=float(target_recall))
        ix.created = ix.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        ix.skipped = int(manifest.get("unreadable", 0))
        ix.build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if chosen != "flat":
            if len(held):
                log(f"tuning the search breadth for recall@{RECALL_K} >= {target_recall}")
                q = np.concatenate(held_vectors)
                ix._tune(q, _exact_streamed(q, held, out / names["vectors"], header, n, dim, RECALL_K))
                index_f.add_with_ids(q, held.astype(np.int64))
            else:
                ix._widest()
        ix.tune_seconds = time.perf_counter() - started
        ix.save(out, prewritten=names)
        return ix


def _blocks(path: Path, header: int, n: int, dim: int, block: int = BLOCK):
    """(first row, float32 [b, dim]) blocks of the vectors file, read (not mapped) so they leave memory."""
    with open(path, "rb") as f:
        f.seek(header)
        for lo in range(0, n, block):
            rows = min(block, n - lo)
            yield lo, np.fromfile(f, dtype="<f4", count=rows * dim).reshape(rows, dim)


def _exact_streamed(q: np.ndarray, held: np.ndarray, path: Path, header: int, n: int, dim: int, k: int) -> np.ndarray:
    """Exact top-k ids of the held-out queries among the other vectors, block by block."""
    import faiss
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo, x in _blocks(path, header, n, dim):
        ids = np.arange(lo, lo + len(x), dtype=np.int64)
        keep = ~np.isin(ids, held)
        x, ids = np.ascontiguousarray(x[keep]), ids[keep]
        if not len(x):
            continue
        s, i = faiss.knn(q, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids[i]], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i
