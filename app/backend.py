"""Where an index lives: FAISS files in a directory (the default) or a Qdrant collection.

Both backends offer what the command line, app.ops and the page use: check_model, add, neighbours
(search), info, present, add_source, record_unreadable, save, load_image, image_path and len();
nothing above this module asks which one it has, except to open or create it.

    --backend faiss                               INDEX_DIR holds the index (index.json, vectors, FAISS)
    --backend qdrant --qdrant-path DIR            Qdrant's local mode in DIR (tests, laptops; brute force)
    --backend qdrant --qdrant-url URL             a Qdrant server; the collection is named after INDEX_DIR,
        [--qdrant-api-key-file FILE | --qdrant-api-key-env NAME]    which keeps only uploaded images
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("faiss", "qdrant")


@dataclass(frozen=True)
class Backend:
    name: str = "faiss"
    qdrant_url: str | None = None
    qdrant_path: str | None = None
    api_key_file: str | None = None
    api_key_env: str | None = None

    @classmethod
    def from_args(cls, args) -> Backend:
        return cls(getattr(args, "backend", "faiss"), getattr(args, "qdrant_url", None),
                   getattr(args, "qdrant_path", None), getattr(args, "qdrant_api_key_file", None),
                   getattr(args, "qdrant_api_key_env", None))

    def problem(self) -> str | None:
        """What is wrong with the flags (None: fine)."""
        if self.name == "faiss" and (self.qdrant_url or self.qdrant_path):
            return "--qdrant-url and --qdrant-path are for --backend qdrant"
        if self.name == "qdrant" and bool(self.qdrant_url) == bool(self.qdrant_path):
            return "--backend qdrant needs either --qdrant-url URL (a server) or --qdrant-path DIR (local mode)"
        if (self.api_key_file or self.api_key_env) and not self.qdrant_url:
            return "a Qdrant API key is for --qdrant-url"
        return None

    @property
    def where(self) -> str:
        return self.qdrant_url or f"local mode {self.qdrant_path}"

    def _client(self):
        from .qdrant_index import open_client
        return open_client(self.qdrant_url, self.qdrant_path, self.api_key_file, self.api_key_env)

    def open(self, index_dir):
        """An existing index."""
        if self.name == "faiss":
            from .faiss_index import SearchIndex
            return SearchIndex.load(index_dir)
        from .qdrant_index import QdrantIndex
        return QdrantIndex.open(self._client(), index_dir, where=self.where)

    def create(self, index_dir, model: dict, force: bool = False):
        """A new, empty Qdrant index (FAISS indexes are built whole: ops.build_index, app.shards)."""
        from .qdrant_index import QdrantIndex
        return QdrantIndex.create(self._client(), index_dir, model, where=self.where, force=force)


def add_flags(p) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default="faiss",
                   help="faiss: files in the index directory (default); qdrant: a Qdrant collection named after it")
    g.add_argument("--qdrant-url", metavar="URL", help="a Qdrant server, e.g. http://127.0.0.1:6333")
    g.add_argument("--qdrant-path", metavar="DIR", help="Qdrant's local mode in DIR (one process at a time; "
                   "brute-force search, for tests and laptops)")
    g.add_argument("--qdrant-api-key-file", metavar="FILE", help="file holding the server's API key")
    g.add_argument("--qdrant-api-key-env", metavar="NAME", help="environment variable holding the server's API key")


def build(backend: Backend, encoder, images, out, *, force: bool = False, batch_size: int = 64,
          progress: bool = True, log=None, **faiss_kwargs):
    """Embed `images` into a new index at `out` on `backend` -> (index, AddReport)."""
    from . import ops
    if backend.name == "faiss":
        return ops.build_index(encoder, images, out, force=force, batch_size=batch_size, progress=progress,
                               log=log, **faiss_kwargs)
    ops.open_images(images)  # a bad path fails before the collection is created
    index = backend.create(out, encoder.model, force=force)
    report = ops.add_collection(index, encoder, images, batch_size=batch_size, progress=progress, log=log)
    if not report.added:
        raise ops.AppError(f"none of the images in {images} could be read "
                           f"(first problem: {report.skipped[0][1] if report.skipped else 'none'})")
    return index, report


def build_from_embeddings(backend: Backend, directory, out, *, kind: str = "auto", target_recall: float = 0.95,
                          model: dict | None = None, force: bool = False, log=None):
    """Index the Parquet shards of python -m app.embed -> the index."""
    if backend.name == "faiss":
        from .shards import build_from_embeddings as faiss_build
        return faiss_build(directory, out, kind=kind, target_recall=target_recall, model=model, log=log)
    from .embed import open_embeddings, read_shard
    from .faiss_index import ModelMismatchError
    from .shards import _naming
    manifest, files = open_embeddings(directory)
    if model is not None and model.get("fingerprint") != manifest["model"].get("fingerprint"):
        raise ModelMismatchError(f"the embeddings in {directory} are of model {manifest['model'].get('fingerprint')}, "
                                 f"but the encoder given has fingerprint {model.get('fingerprint')}")
    index = backend.create(out, manifest["model"], force=force)
    sources, name_of = _naming(manifest)
    for s in sources:
        index.add_source(s["kind"], s["path"])
    for path in files:
        vectors, srcs, labels = read_shard(path)
        items = [{"source": a, "name": b, "label": label} for (a, b), label in zip(map(name_of, srcs), labels)]
        index.add(vectors, items, model=manifest["model"])
        if log:
            log(f"  {Path(path).name}: {len(items)} vectors")
    index.skipped = int(manifest.get("unreadable", 0))
    index.save()
    return index


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
