"""Embed an image collection into sharded Parquet files, on this machine or on a Ray cluster.

    python -m app.embed --images DIR|ZIP|LIST.txt|SHARDS.tar... --model model.onnx --out EMB_DIR
    python -m app.embed ... --engine ray [--address ray://head:10001] [--workers 8]
    python -m app.index build --embeddings EMB_DIR --out INDEX_DIR        # then index them

Inputs: an image folder (sub-folders name classes) or a zip archive of one, a list file (.txt,
one image path a line, optionally followed by a tab and a label; relative paths are relative to
the list file), or WebDataset tar shards as img2dataset writes them (`{00000..00099}.tar` or a
folder of .tar files; a sample's `.cls` member, if any, is its label), read as a stream without
unpacking.

The input is cut into shards by input order: each tar file is one shard; a folder, zip or list
is cut every --shard-size images. Shard i becomes EMB_DIR/part-<i>.parquet, with columns
id (int64: shard << 32 | position in the shard's input), source (where the image is), label,
embedding (fixed-size list of float32), written atomically; EMB_DIR/manifest.json records the
model's fingerprint, the input and the shard plan. A re-run skips the shards already written,
so a killed job resumes where it stopped. Unreadable images are counted per shard (in the
file's metadata and the manifest), never fatal.

--engine local (the default) embeds one shard after another in this process; --engine ray runs
the same shard function on Ray Data actors (one encoder loaded per actor), so both engines write
the same files. On a cluster, EMB_DIR and the inputs must be on a file system every node sees.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tarfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.deployment import DEFAULT_MODEL_NAME
from contract.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from trainer.data import DataError, FolderCollection, ZipCollection, open_collection

from . import CommandParser

MANIFEST = "manifest.json"
FORMAT = "byolkit-embeddings/1"
META_KEY = b"byolkit"
DEFAULT_SHARD_SIZE = 10_000
# an image file larger than this is refused before it is read into memory (a 64-megapixel JPEG
# is about 20 MB; PNG and TIFF can be larger but not this much)
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class EmbedError(ValueError):
    """An embedding job that cannot run as asked (bad input, a foreign output folder)."""


# ----------------------------------------------------------------------------------------------
# Inputs: a plan of shards, each a list of (source, label, reader)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What to embed, cut into shards by input order. Picklable: Ray ships it to every actor."""

    kind: str               # "collection" (folder / zip / torchvision), "list", "tar"
    spec: str               # what the user gave (resolved paths)
    shard_size: int
    n_shards: int
    paths: tuple = ()       # tar files (kind "tar") or image paths (kind "list")
    labels: tuple = ()      # labels of a list file's images ("" for none)

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "shard_size": self.shard_size, "shards": self.n_shards}

    def records(self, shard: int):
        """(source, label, load) of shard `shard`'s images in input order; load() -> RGB PIL image."""
        if self.kind == "tar":
            yield from _tar_records(self.paths[shard])
            return
        lo = shard * self.shard_size
        if self.kind == "list":
            for path, label in zip(self.paths[lo:lo + self.shard_size], self.labels[lo:lo + self.shard_size]):
                yield path, label or None, (lambda p=path: _load_file(p))
            return
        collection = _collection(self.spec)
        classes, labels = list(collection.classes or []), collection.labels
        for i in range(lo, min(lo + self.shard_size, len(collection))):
            label = labels[i] if labels is not None else None
            yield (_source(collection, i), classes[label] if label is not None and 0 <= label < len(classes)
                   else None, (lambda i=i: collection.load(i)))


_COLLECTIONS: dict = {}


def _collection(spec: str):
    """One opened collection per process (a folder walk or a zip directory read once)."""
    if spec not in _COLLECTIONS:
        _COLLECTIONS[spec] = open_collection(spec)
    return _COLLECTIONS[spec]


def _source(collection, i: int) -> str:
    if isinstance(collection, FolderCollection):
        return str(Path(collection.root).resolve() / collection.name(i))
    if isinstance(collection, ZipCollection):
        return f"{Path(collection.path).resolve()}:{collection.name(i)}"
    return f"{collection.description}#{i}"


def _load_file(path: str):
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageDecodeError(f"cannot open image {path}: {e.strerror or e}") from None
    if size > MAX_IMAGE_BYTES:
        raise ImageDecodeError(f"image {path} is {size} bytes, above the limit of {MAX_IMAGE_BYTES}")
    return load_rgb(path)


def _tar_records(tar_path: str):
    """img2dataset's layout: members grouped by key (`000000012.jpg`, `000000012.json`, ...), read as
    a stream. A sample's image is its first member with an image extension; `.cls` is its label."""
    def flush(key, members):
        image = next(((ext, member) for ext, member in members.items() if "." + ext in IMAGE_EXTENSIONS), None)
        label = members.get("cls", (None, None))[1]
        label = label.decode("utf-8", "replace").strip() if isinstance(label, bytes) else None
        if image is None:
            return None
        _, (name, data) = image
        source = f"{tar_path}:{name}"  # the member's own name: read back by read_tar_source
        if isinstance(data, str):  # too large: refused before it was read
            return source, label, _refused(data)
        return source, label, (lambda d=data, s=source: load_rgb(d, name=s))

    key, members = None, {}
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                if stem.startswith("._") or not ext:
                    continue
                k = member.name[: len(member.name) - len(base)] + stem
                if k != key and key is not None:
                    record = flush(key, members)
                    if record:
                        yield record
                    members = {}
                key = k
                ext = ext.lower()
                wanted = "." + ext in IMAGE_EXTENSIONS or ext == "cls"
                if not wanted:
                    continue
                if member.size > MAX_IMAGE_BYTES:
                    members[ext] = member.name, (f"{tar_path}:{member.name} is {member.size} bytes, above the "
                                                 f"limit of {MAX_IMAGE_BYTES}")
                    continue
                f = tar.extractfile(member)
                members[ext] = member.name, f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated shard: what was read counts
        if key is not None:
            record = flush(key, members)
            if record:
                yield record
        yield tar_path, None, _refused(f"{tar_path} is damaged after this point ({e})")
        return
    if key is not None:
        record = flush(key, members)
        if record:
            yield record


def _refused(reason: str):
    def load():
        raise ImageDecodeError(reason)
    return load


_TAR_INDEXES: OrderedDict = OrderedDict()  # (tar path, mtime, size) -> {member name: TarInfo}, the newest last
_TAR_INDEXES_KEPT = 8
_TAR_LOCK = threading.Lock()


def read_tar_source(source: str) -> bytes:
    """The bytes of the image at a tar shard's `source` (`/shards/00001.tar:000010000.jpg`, as
    _tar_records names it) by random access; the member lists of the last few tars are kept, so a
    page of results from one shard reads its headers once. ImageDecodeError when it cannot."""
    cut = [i for i, c in enumerate(source) if c == ":" and Path(source[:i]).is_file()]
    if not cut:
        raise ImageDecodeError(f"cannot read {source}: no tar shard there")
    tar_path, name = source[:cut[0]], source[cut[0] + 1:]
    try:
        st = os.stat(tar_path)
        key = (tar_path, st.st_mtime_ns, st.st_size)
        with tarfile.open(tar_path) as tar:
            with _TAR_LOCK:
                members = _TAR_INDEXES.pop(key, None)
            if members is None:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
            with _TAR_LOCK:
                _TAR_INDEXES[key] = members
                while len(_TAR_INDEXES) > _TAR_INDEXES_KEPT:
                    _TAR_INDEXES.popitem(last=False)
            info = members.get(name)
            if info is None:
                raise ImageDecodeError(f"cannot read {source}: {tar_path} holds no member {name}")
            if info.size > MAX_IMAGE_BYTES:
                raise ImageDecodeError(f"{source} is {info.size} bytes, above the limit of {MAX_IMAGE_BYTES}")
            return tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageDecodeError(f"cannot read {source}: {e}") from None


def _expand_shards(spec: str) -> list[str]:
    """`dir/{00000..00009}.tar` (brace ranges, as img2dataset and webdataset write them), a glob, or a
    folder of .tar files -> the tar files in order."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        width, lo, hi = len(m.group(1)), int(m.group(1)), int(m.group(2))
        out = []
        for i in range(lo, hi + 1):
            out += _expand_shards(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])
        return out
    if Path(spec).is_dir():
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec] if Path(spec).is_file() else []


def plan_input(images, shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """What the user names (one string, or several tar files) -> a Plan."""
    specs = [images] if isinstance(images, (str, Path)) else list(images)
    specs = [str(s) for s in specs]
    if shard_size < 1:
        raise EmbedError("--shard-size must be at least 1")
    tars = [s for s in specs if s.endswith(".tar") or "{" in s or (Path(s).is_dir() and any(Path(s).glob("*.tar")))]
    if tars:
        if len(tars) != len(specs):
            raise EmbedError("give either WebDataset tar shards or one folder, zip or list file, not a mix")
        files = [f for s in specs for f in _expand_shards(s)]
        if not files:
            raise EmbedError(f"no tar shards found at {' '.join(specs)}")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise EmbedError(f"tar shard {missing[0]} does not exist")
        files = [str(Path(f).resolve()) for f in files]
        return Plan("tar", " ".join(specs), 0, len(files), paths=tuple(files))
    if len(specs) != 1:
        raise EmbedError("give one folder, zip archive or list file (several inputs only as tar shards)")
    spec = specs[0]
    if spec.endswith((".txt", ".lst")):
        return _plan_list(Path(spec), shard_size)
    try:
        collection = _collection(str(Path(spec).resolve()) if Path(spec).exists() else spec)
    except DataError as e:
        raise EmbedError(str(e)) from None
    resolved = str(Path(spec).resolve()) if Path(spec).exists() else spec
    n = len(collection)
    return Plan("collection", resolved, shard_size, max(1, -(-n // shard_size)))


def _plan_list(path: Path, shard_size: int) -> Plan:
    if not path.is_file():
        raise EmbedError(f"list file {path} does not exist")
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            p, _, label = line.partition("\t")
            p = Path(p.strip()).expanduser()
            paths.append(str(p if p.is_absolute() else (path.parent / p).resolve()))
            labels.append(label.strip())
    if not paths:
        raise EmbedError(f"list file {path} names no images")
    return Plan("list", str(path.resolve()), shard_size, -(-len(paths) // shard_size), tuple(paths), tuple(labels))


# ----------------------------------------------------------------------------------------------
# One shard: decode, embed, write (the same function for both engines)
# ----------------------------------------------------------------------------------------------
def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def embed_shard(plan: Plan, shard: int, encoder, out: Path, *, batch_size: int = 64, threads: int = 2,
                on_images=None) -> dict:
    """Embed shard `shard` of `plan` and write out/part-<shard>.parquet atomically -> its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pre, dim = encoder.preprocessing, encoder.embedding_dim
    ids, sources, labels, vectors, unreadable = [], [], [], [], []

    def decode(record):
        source, label, load = record
        try:
            return source, label, pre.resize_and_crop(load()), None
        except ImageDecodeError as e:
            return source, label, None, str(e)

    started = time.perf_counter()
    position = 0
    records = plan.records(shard)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while True:
            batch = [r for _, r in zip(range(batch_size), records)]
            if not batch:
                break
            pixels = []
            for source, label, hwc, error in pool.map(decode, batch):
                if hwc is None:
                    unreadable.append({"source": source, "reason": error})
                else:
                    ids.append((shard << 32) | position)
                    sources.append(source)
                    labels.append(label)
                    pixels.append(hwc)
                position += 1
            if pixels:
                vectors.append(encoder.embed(np.stack(pixels), batch_size=batch_size))
            if on_images:
                on_images(len(batch))
    matrix = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    stats = {"shard": shard, "file": shard_name(shard), "rows": len(ids), "unreadable": len(unreadable),
             "unreadable_examples": unreadable[:20], "fingerprint": encoder.model["fingerprint"],
             "seconds": round(time.perf_counter() - started, 3)}
    table = pa.table({"id": pa.array(ids, pa.int64()), "source": pa.array(sources, pa.string()),
                      "label": pa.array(labels, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()),
                                                                      dim)})
    table = table.replace_schema_metadata({META_KEY: json.dumps(stats).encode()})
    target = out / shard_name(shard)
    tmp = out / f".{shard_name(shard)}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)  # a shard file exists only once complete
    return stats


def shard_stats(path: Path) -> dict:
    """The stats written into a shard file's metadata (raises EmbedError for a damaged file)."""
    import pyarrow.parquet as pq
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY])
    except (OSError, KeyError, ValueError) as e:
        raise EmbedError(f"{path} is not a byolkit embedding shard ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """How each worker opens the encoder (an ONNX file, or a server); no secret travels in it."""

    model: str | None = None
    server: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    threads: int = 0

    def open(self):
        from .embedding import open_encoder
        return open_encoder(self.model, self.server, self.model_name, threads=self.threads)


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EmbedError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EmbedError(f"{path} is not a byolkit embeddings manifest")
    return m


def _write_manifest(out: Path, manifest: dict) -> None:
    from trainer.checkpoint import atomic_write
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n",
                                                                     encoding="utf-8"))


def run(images, out, encoder_spec: EncoderSpec, *, engine: str = "local", address: str | None = None,
        workers: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 64, progress: bool = True,
        log=None) -> dict:
    """Embed every shard of `images` not yet in `out` -> the manifest (also written to out/manifest.json)."""
    log = log or (lambda msg: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} is a file, not a folder")
    plan = plan_input(images, shard_size)
    encoder = encoder_spec.open()  # here too: the model's identity goes into the manifest
    model = encoder.model
    old = _read_manifest(out)
    if old is not None:
        if old["model"].get("fingerprint") != model["fingerprint"]:
            raise EmbedError(f"{out} holds embeddings of model {old['model'].get('fingerprint')}, not of this "
                             f"model ({model['fingerprint']}); choose a new --out")
        if old["input"] != plan.describe():
            raise EmbedError(f"{out} holds embeddings of another input ({old['input']['spec']}, shard size "
                             f"{old['input']['shard_size']}); choose a new --out or the same input and shard size")
    elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise EmbedError(f"{out} exists and holds no embeddings manifest; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "model": model, "input": plan.describe(), "engine": engine, "shards": []}
    _write_manifest(out, manifest)

    done = {}
    for shard in range(plan.n_shards):
        path = out / shard_name(shard)
        if path.is_file():
            try:
                done[shard] = shard_stats(path)
            except EmbedError:
                path.unlink()  # an unreadable leftover: embedded again
    for p in out.glob(".part-*.tmp"):  # an interrupted write
        p.unlink(missing_ok=True)
    todo = [s for s in range(plan.n_shards) if s not in done]
    if done:
        log(f"resuming: {len(done)} of {plan.n_shards} shards already written, {len(todo)} to go")
    started = time.perf_counter()
    if todo:
        if engine == "local":
            new = _run_local(plan, todo, encoder, out, batch_size=batch_size, progress=progress)
        elif engine == "ray":
            encoder.close()
            new = _run_ray(plan, todo, encoder_spec, out, address=address, workers=workers, batch_size=batch_size)
        else:
            raise EmbedError(f"unknown engine {engine!r} (choose local or ray)")
        done.update({s["shard"]: s for s in new})
    if engine == "local":
        encoder.close()
    stats = [done[s] for s in sorted(done)]
    bad = [s for s in stats if s.get("fingerprint") != model["fingerprint"]]
    if bad:
        raise EmbedError(f"{out / bad[0]['file']} holds embeddings of model {bad[0].get('fingerprint')}, not "
                         f"{model['fingerprint']}")
    manifest.update(shards=[{k: s[k] for k in ("file", "rows", "unreadable")} for s in stats],
                    rows=sum(s["rows"] for s in stats), unreadable=sum(s["unreadable"] for s in stats),
                    embedded_now=len(todo), seconds=round(time.perf_counter() - started, 3),
                    unreadable_examples=[u for s in stats for u in s["unreadable_examples"]][:20])
    _write_manifest(out, manifest)
    return manifest


def _run_local(plan: Plan, todo, encoder, out: Path, *, batch_size: int, progress: bool) -> list[dict]:
    from tqdm import tqdm
    bar = tqdm(total=None if plan.kind == "tar" else len(todo) * plan.shard_size, unit="img", desc="embedding",
               disable=not progress, file=sys.stderr, leave=False)
    try:
        return [embed_shard(plan, s, encoder, out, batch_size=batch_size, on_images=bar.update) for s in todo]
    finally:
        bar.close()


class _ShardWorker:
    """A Ray Data actor: opens the encoder once, then embeds whole shards."""

    def __init__(self, plan: Plan, spec: EncoderSpec, out: str, batch_size: int):
        self.plan, self.out, self.batch_size = plan, Path(out), batch_size
        self.encoder = spec.open()

    def __call__(self, batch: dict) -> dict:
        stats = [embed_shard(self.plan, int(s), self.encoder, self.out, batch_size=self.batch_size)
                 for s in batch["shard"]]
        return {"stats": [json.dumps(s) for s in stats]}


def _run_ray(plan: Plan, todo, spec: EncoderSpec, out: Path, *, address, workers: int, batch_size: int):
    try:
        import ray
    except ImportError:
        raise EmbedError("--engine ray needs Ray: pip install 'byolkit[scale]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else (workers or None), log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    try:
        actors = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        actors = min(actors, len(todo))
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_ShardWorker, batch_size=1, concurrency=actors, num_cpus=1,
                            fn_constructor_kwargs={"plan": plan, "spec": spec, "out": str(out.resolve()),
                                                   "batch_size": batch_size})
        return [json.loads(row["stats"]) for row in ds.iter_rows()]
    finally:
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Reading the shards back
# ----------------------------------------------------------------------------------------------
def open_embeddings(directory) -> tuple[dict, list[Path]]:
    """A finished embeddings folder -> (manifest, shard files in order), every shard checked against
    the manifest's model (fingerprint and size) without reading its vectors."""
    import pyarrow.parquet as pq
    directory = Path(directory)
    m = _read_manifest(directory)
    if m is None:
        raise EmbedError(f"no embeddings at {directory} (no {MANIFEST}); make them with python -m app.embed")
    if not m.get("shards") and m["input"]["shards"]:
        raise EmbedError(f"the embedding job in {directory} has not finished; run python -m app.embed again")
    fp, dim = m["model"]["fingerprint"], int(m["model"]["embedding_dim"])
    files = []
    for entry in m["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise EmbedError(f"shard {path} is missing")
        stats = shard_stats(path)
        if stats.get("fingerprint") != fp:
            raise EmbedError(f"shard {path} holds embeddings of model {stats.get('fingerprint')}, but the "
                             f"collection is of model {fp}")
        try:
            meta = pq.read_metadata(path)
            emb = pq.read_schema(path).field("embedding").type
        except (OSError, KeyError, ValueError) as e:
            raise EmbedError(f"shard {path} is damaged ({type(e).__name__}: {e})") from None
        if getattr(emb, "list_size", None) != dim or meta.num_rows != entry["rows"]:
            raise EmbedError(f"shard {path} does not match the manifest ({meta.num_rows} rows of "
                             f"{getattr(emb, 'list_size', '?')}-d, expected {entry['rows']} of {dim}-d)")
        files.append(path)
    return m, files


def read_shard(path: Path) -> tuple[np.ndarray, list, list]:
    """One shard -> (float32 [n, D], sources, labels)."""
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path, columns=["source", "label", "embedding"])
    except (OSError, ValueError) as e:
        raise EmbedError(f"shard {path} is damaged ({type(e).__name__}: {e})") from None
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return vectors, table.column("source").to_pylist(), table.column("label").to_pylist()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m app.embed", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, nargs="+", metavar="INPUT",
                   help="image folder, zip archive, list file (.txt), or WebDataset tar shards")
    p.add_argument("--out", required=True, help="output folder of Parquet shards and manifest.json (re-run to resume)")
    g = p.add_argument_group("encoder (one of)")
    g.add_argument("--model", metavar="MODEL.onnx", help="an exported encoder, loaded once per worker")
    g.add_argument("--server", metavar="URL", help="a byolkit server: grpc://host:8001 or http://host:8000")
    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the served model's name (default %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per worker (0: all cores)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default, no Ray needed); ray: Ray Data actors")
    p.add_argument("--address", help="Ray cluster to join (ray://head:10001 or auto); default: a local Ray")
    p.add_argument("--workers", type=int, default=0, help="Ray actors, one encoder each (default: one per CPU)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="images per output shard for folders, zips and lists (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.server):
        parser.error("give the encoder as either --model MODEL.onnx or --server URL")
    if args.batch_size < 1 or args.shard_size < 1 or args.workers < 0:
        parser.error("--batch-size and --shard-size must be at least 1, --workers 0 or more")
    if args.address and args.engine != "ray":
        parser.error("--address is for --engine ray")
    from . import missing
    problem = missing("pyarrow", "onnxruntime" if args.model else "tritonclient")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from .embedding import EncoderError
    try:
        m = run(args.images if len(args.images) > 1 else args.images[0], args.out,
                EncoderSpec(args.model, args.server, args.model_name, args.threads), engine=args.engine,
                address=args.address, workers=args.workers, shard_size=args.shard_size, batch_size=args.batch_size,
                progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (EmbedError, EncoderError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for u in m["unreadable_examples"][:5]:
        print(f"  skipped {u['source']}: {u['reason']}", file=sys.stderr)
    rate = f", {m['rows'] / m['seconds']:.0f} images/s" if m["embedded_now"] and m["seconds"] else ""
    print(f"{m['rows']} embeddings in {len(m['shards'])} shards at {args.out} ({m['unreadable']} unreadable skipped; "
          f"{m['embedded_now']} shards embedded now{rate}); model fingerprint {m['model']['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
