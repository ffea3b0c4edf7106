"""Scale out on one small machine: app.embed's engines, the IVF-PQ build from shards, Qdrant local mode.

    python benchmarks/scale_out.py embed  --images ../shared/data/cifar10/test.zip \
        --json benchmarks/results/scale_embed.json
    python benchmarks/scale_out.py shards --sizes 10000000           # once: the largest collection's shards
    python benchmarks/scale_out.py ivfpq  --sizes 2000000 --json benchmarks/results/scale_ivfpq.json   # one size a run
    python benchmarks/scale_out.py qdrant --n 100000 --json benchmarks/results/scale_qdrant.json

embed: a seeded random CIFAR encoder (ResNet-18 at half width, small stem, 32 px; exported once
  with export.onnx) embeds the images with --engine local (one process, ONNX Runtime on every
  core) and --engine ray (a local Ray with 2 CPUs: 2 actors of 1 thread); images/s of each, the
  Ray overhead as the ratio of their times (with and without Ray's start-up), and the two runs'
  shards compared row by row.
shards: clustered synthetic 128-d vectors of the largest --sizes written once as Parquet shards
  of --shard-rows (kept in --work); a smaller size is a prefix of them (its shards hard-linked
  into a folder of its own, with its own manifest), so each size can be built in a run of its own.
ivfpq: `python -m app.index build --embeddings --index-type ivfpq` of each size in a child process
  whose memory is sampled every 50 ms (/proc: VmRSS, RssAnon = heap, RssFile = mapped files) plus
  its ru_maxrss; --json gathers the sizes (a size measured again replaces its row).
qdrant: --n clustered 128-d vectors in Qdrant's local mode (on disk) against FAISS exact search;
  recall@10 and one-query latency. Local mode searches by brute force in numpy: this says how it
  compares with FAISS on a laptop, nothing about a Qdrant server (HNSW, quantisation, shards).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clustered(n: int, dim: int, seed: int, chunk: int = 100_000):
    """Blocks of index_scale.py's vectors: 1,000 clusters, each spread over its own 32-dimensional
    subspace plus noise 0.3 per dimension, L2-normalised."""
    from index_scale import clustered_blocks
    yield from clustered_blocks(n, dim, clusters=1000, latent=32, noise=0.3, seed=seed, chunk=chunk)


# ----------------------------------------------------------------------------------------------
def bench_embed(args) -> dict:
    from app import embed as E
    from export import onnx as xo
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "resnet18_w32_small32.onnx"
    if not model.exists():
        log("exporting a random ResNet-18/2 encoder")
        xo.export_onnx("random:resnet18_w32:small:32", model)
    out = {}
    for engine in ("local", "ray"):
        target = work / f"emb-{engine}"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        ray_start = 0.0
        if engine == "ray":
            import ray
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray_start = time.perf_counter() - started
        spec = E.EncoderSpec(str(model), threads=0 if engine == "local" else 1)
        m = E.run(args.images, target, spec, engine=engine, workers=2, shard_size=args.shard_size,
                  batch_size=64, progress=False, log=log)
        total = time.perf_counter() - started
        if engine == "ray":
            import ray
            ray.shutdown()
        out[engine] = {"images": m["rows"], "unreadable": m["unreadable"], "shards": len(m["shards"]),
                       "seconds_total": round(total, 2), "seconds_embedding": round(m["seconds"], 2),
                       "ray_start_s": round(ray_start, 2),
                       "images_per_s": round(m["rows"] / m["seconds"], 1)}
        log(f"{engine}: {out[engine]}")
    diffs, same_meta = [], True
    for entry in json.loads((work / "emb-local" / "manifest.json").read_text())["shards"]:
        a, sa, la = _table(work / "emb-local" / entry["file"])
        b, sb, lb = _table(work / "emb-ray" / entry["file"])
        same_meta &= (sa == sb and la == lb)
        diffs.append(float(np.abs(a - b).max()))
    out["same_rows_sources_labels"] = same_meta
    out["max_abs_diff"] = max(diffs)
    out["ray_overhead_embedding"] = round(out["ray"]["seconds_embedding"] / out["local"]["seconds_embedding"], 3)
    out["ray_overhead_total"] = round(out["ray"]["seconds_total"] / out["local"]["seconds_total"], 3)
    return out


def _table(path):
    import pyarrow.parquet as pq
    t = pq.read_table(path)
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), t.column("source").to_pylist(), \
        t.column("label").to_pylist()


# ----------------------------------------------------------------------------------------------
def write_shards(directory: Path, n: int, dim: int, shard_rows: int, seed: int) -> None:
    """n clustered vectors as app.embed's shards (skipped when `directory` already holds them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app import embed as E
    plan = {"n": n, "dim": dim, "shard_rows": shard_rows, "seed": seed}
    done = directory / "synthetic.json"
    if done.is_file() and json.loads(done.read_text()) == plan:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    pos = 0
    for s, x in enumerate(clustered(n, dim, seed, chunk=shard_rows)):
        stats = {"shard": s, "file": E.shard_name(s), "rows": len(x), "unreadable": 0, "unreadable_examples": [],
                 "fingerprint": f"synthetic-{dim}"}
        t = pa.table({"id": pa.array(np.arange(pos, pos + len(x)), pa.int64()),
                      "source": pa.array([f"v/{i}" for i in range(pos, pos + len(x))]),
                      "label": pa.nulls(len(x), pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})
        pq.write_table(t.replace_schema_metadata({E.META_KEY: json.dumps(stats).encode()}),
                       directory / stats["file"])
        pos += len(x)
    done.write_text(json.dumps(plan))


def prefix_collection(source: Path, target: Path, n: int, dim: int, shard_rows: int) -> None:
    """The first n vectors of `source`'s shards as a collection of its own: its whole shards
    hard-linked into `target`, and a manifest that names only them."""
    from app import embed as E
    if n % shard_rows:
        raise SystemExit(f"error: a size ({n}) must be a multiple of --shard-rows ({shard_rows})")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shards = []
    for s in range(n // shard_rows):
        os.link(source / E.shard_name(s), target / E.shard_name(s))
        shards.append({"file": E.shard_name(s), "rows": shard_rows, "unreadable": 0})
    (target / E.MANIFEST).write_text(json.dumps({
        "format": E.FORMAT, "model": {"fingerprint": f"synthetic-{dim}", "embedding_dim": dim}, "shards": shards,
        "rows": n, "unreadable": 0,
        "input": {"kind": "list", "spec": "/synthetic.txt", "shard_size": shard_rows, "shards": len(shards)}}))


def all_shards(args) -> Path:
    return Path(args.work) / f"shards-{args.dim}d-{args.shard_rows}"


def bench_shards(args) -> dict:
    t = time.perf_counter()
    write_shards(all_shards(args), max(args.sizes), args.dim, args.shard_rows, seed=0)
    size = sum(f.stat().st_size for f in all_shards(args).glob("*.parquet"))
    return {"n": max(args.sizes), "dim": args.dim, "shard_rows": args.shard_rows, "seconds": round(time.perf_counter()
            - t, 1), "parquet_mb": round(size / 2**20, 1)}


def run_sampled(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its /proc status every 50 ms -> peaks (bytes) and seconds."""
    fields = ("VmRSS", "RssAnon", "RssFile")
    peaks = dict.fromkeys(fields, 0)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{stderr}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss": peaks["VmRSS"],
            "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "ru_maxrss_children": usage.ru_maxrss * 1024,
            "stdout": stdout.strip()}


def mib(sampled: dict) -> dict:
    """run_sampled's peaks in MiB."""
    return {f"{k}_mb": round(sampled[k] / 2**20, 1) for k in ("peak_rss", "peak_anon", "peak_file")}


SERVE = """
import sys, time, json, numpy as np
from app.faiss_index import SearchIndex
t = time.perf_counter(); ix = SearchIndex.load(sys.argv[1]); load = time.perf_counter() - t
q = np.asarray(ix.vectors[::max(1, len(ix) // 100)][:100]); t = time.perf_counter()
for row in q:
    ix.search(row[None], 10)
print(json.dumps({"load_s": round(load, 1), "ms_per_query": round((time.perf_counter() - t) * 10, 2)}))
"""


def bench_ivfpq(args) -> dict:
    work, source = Path(args.work), all_shards(args)
    if not (source / "synthetic.json").is_file() or json.loads((source / "synthetic.json").read_text())["n"] \
            < max(args.sizes):
        raise SystemExit(f"error: no shards of {max(args.sizes)} vectors in {source}: run the `shards` part first")
    out = {"dim": args.dim, "shard_rows": args.shard_rows, "shard_mb": round(args.shard_rows * args.dim * 4 / 2**20, 1),
           "runs": []}
    if args.json and Path(args.json).is_file():  # the sizes measured before, in runs of their own
        before = json.loads(Path(args.json).read_text())
        if (before.get("dim"), before.get("shard_rows")) == (args.dim, args.shard_rows):
            out["runs"] = [r for r in before.get("runs", []) if r["n"] not in args.sizes]
    for n in args.sizes:
        emb, ix = work / f"shards-{n}", work / f"ix-{n}"
        prefix_collection(source, emb, n, args.dim, args.shard_rows)
        shutil.rmtree(ix, ignore_errors=True)
        log(f"{n}: building")
        r = run_sampled([sys.executable, "-m", "app.index", "build", "--embeddings", str(emb), "--out", str(ix),
                         "--index-type", "ivfpq"])
        manifest = json.loads((ix / "index.json").read_text())
        files = {k: (ix / v).stat().st_size for k, v in manifest["files"].items()}
        run = {"n": n, "vectors_mb": round(n * args.dim * 4 / 2**20, 1), "build_s": r["seconds"],
               "peak_rss_mb": round(r["peak_rss"] / 2**20, 1), "peak_anon_mb": round(r["peak_anon"] / 2**20, 1),
               "peak_file_mb": round(r["peak_file"] / 2**20, 1),
               "ru_maxrss_mb": round(r["ru_maxrss_children"] / 2**20, 1),
               "files_mb": {k: round(v / 2**20, 1) for k, v in files.items()},
               "params": manifest["index"]["params"], "recall": manifest["index"]["recall"], "summary": r["stdout"]}
        run["faiss_index_mb"] = run["files_mb"].get("index")
        # serving it: SearchIndex.load (FAISS structure read, vectors mapped, items parsed) and 100 searches
        s = run_sampled([sys.executable, "-c", SERVE, str(ix)])
        run["serve"] = {**mib(s), **json.loads(s["stdout"])}
        out["runs"].append(run)
        log(json.dumps(run))
        shutil.rmtree(emb, ignore_errors=True)
        shutil.rmtree(ix, ignore_errors=True)
    out["runs"].sort(key=lambda r: r["n"])
    # what the same process holds before any vector: the command's imports (FAISS, pyarrow, NumPy, ...)
    base = run_sampled([sys.executable, "-c", "import faiss, pyarrow.parquet, app.index, app.shards, app.embed"])
    out["baseline"] = mib(base)
    return out


# ----------------------------------------------------------------------------------------------
def bench_qdrant(args) -> dict:
    import faiss
    from qdrant_client import QdrantClient, models
    x = np.concatenate(list(clustered(args.n + args.queries, args.dim, seed=7)))
    base, queries = x[:args.n], x[args.n:]
    _, truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    lat_f = []
    for q in queries:
        t = time.perf_counter()
        flat.search(q[None], 10)
        lat_f.append(time.perf_counter() - t)
    path = Path(tempfile.mkdtemp(prefix="qdrant-bench-", dir=args.work))
    client = QdrantClient(path=str(path))
    client.create_collection("bench", vectors_config=models.VectorParams(size=args.dim,
                                                                           distance=models.Distance.COSINE))
    t = time.perf_counter()
    for lo in range(0, args.n, 1000):
        client.upsert("bench", points=models.Batch(ids=list(range(lo, min(lo + 1000, args.n))),
                                                   vectors=base[lo:lo + 1000].tolist()), wait=True)
    upsert_s = time.perf_counter() - t
    lat_q, found = [], []
    for q in queries:
        t = time.perf_counter()
        res = client.query_points("bench", query=q.tolist(), limit=10)
        lat_q.append(time.perf_counter() - t)
        found.append([p.id for p in res.points])
    client.close()
    shutil.rmtree(path, ignore_errors=True)
    recall = float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
    ms = lambda v, p: round(float(np.percentile(v, p)) * 1e3, 2)
    return {"n": args.n, "dim": args.dim, "queries": args.queries, "qdrant_local_recall_at_10": round(recall, 4),
            "qdrant_local_upsert_s": round(upsert_s, 1),
            "qdrant_local_ms_p50": ms(lat_q, 50), "qdrant_local_ms_p99": ms(lat_q, 99),
            "faiss_exact_ms_p50": ms(lat_f, 50), "faiss_exact_ms_p99": ms(lat_f, 99),
            "latency_ratio_p50": round(float(np.median(lat_q) / np.median(lat_f)), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("embed", "shards", "ivfpq", "qdrant"))
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "test.zip"))
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--sizes", type=int, nargs="+", default=[2_000_000])
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "byolkit-scale-bench"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    parts = {"embed": bench_embed, "shards": bench_shards, "ivfpq": bench_ivfpq, "qdrant": bench_qdrant}
    result = parts[args.part](args)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["command"] = "python benchmarks/scale_out.py " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
