"""Search at scale: the app's index (app/faiss_index.py) over 1M clustered 512-d vectors on this CPU.

    python benchmarks/index_scale.py --n 1000000 --dim 512 --json benchmarks/results/index_scale.json

The vectors: `--clusters` centres drawn from N(0, I); each cluster spreads over its own random
`--latent`-dimensional subspace (as learned embeddings do: a few directions of variation per
concept) plus isotropic noise of standard deviation `--noise` per dimension; all L2-normalised.
Queries are `--queries` further vectors of the same distribution, not in the index. Ground truth:
exact inner-product top-10 (FAISS brute force).

For each kind (exact, HNSW, IVF-PQ) this measures, through `SearchIndex` exactly as the app uses it:
  * build time (training + adding) and tuning time (raising the search breadth until recall@10
    of 1,000 vectors held out of the index reaches --target-recall; they are added afterwards);
  * memory: the FAISS structure's serialised size, and the process's resident-set growth;
  * query latency: one query at a time (batch 1), median and 99th percentile over the held-out
    queries, with their recall@10 against exact; also a sweep of search breadths.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # puts the repository root on sys.path

from app import faiss_index as fi


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clustered(n: int, dim: int, clusters: int, latent: int, noise: float, seed: int, chunk: int = 100_000):
    """float32 [n, dim], normalised, generated in chunks (the 1M x 512 array is 2 GB; its
    intermediates stay small)."""
    out = np.empty((n, dim), np.float32)
    start = 0
    for x in clustered_blocks(n, dim, clusters, latent, noise, seed, chunk):
        out[start:start + len(x)] = x
        start += len(x)
    return out


def clustered_blocks(n: int, dim: int, clusters: int, latent: int, noise: float, seed: int, chunk: int = 100_000):
    """The vectors of `clustered`, as blocks of `chunk` rows (for collections larger than memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    bases = (rng.standard_normal((clusters, latent, dim), dtype=np.float32) / np.sqrt(latent)).astype(np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.integers(0, clusters, m)
        z = rng.standard_normal((m, latent), dtype=np.float32)
        x = centres[labels] + np.einsum("nl,nld->nd", z, bases[labels], optimize=True)
        x += noise * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def latency(index: fi.SearchIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    times, found = [], []
    index.search(queries[:5], k)  # warm-up
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    times_ms = np.asarray(times) * 1e3
    return {"recall_at_10": round(fi.recall_at_k(np.asarray(found), truth, k), 4),
            "median_ms": round(float(np.median(times_ms)), 3), "p99_ms": round(float(np.percentile(times_ms, 99)), 3),
            "mean_ms": round(float(times_ms.mean()), 3)}


def serialized_size(index) -> int:
    import faiss
    return int(faiss.serialize_index(index).nbytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--latent", type=int, default=32, help="dimensions of variation within a cluster")
    p.add_argument("--noise", type=float, default=0.3, help="isotropic noise (std per dimension)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for latency and recall")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated: flat, hnsw, ivfpq")
    p.add_argument("--flat-queries", type=int, default=50, help="queries timed for exact search (slow)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=0, help="FAISS threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("flat", "hnsw", "ivfpq")]
    if unknown or args.n < 100 or args.queries < 1:
        print(f"error: need --n >= 100, --queries >= 1 and kinds among flat, hnsw, ivfpq (got {unknown})",
              file=sys.stderr)
        return 2

    import faiss
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(numpy=np.__version__),
               "settings": vars(args),
               "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "kinds": {}}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    data = clustered(args.n + args.queries, args.dim, args.clusters, args.latent, args.noise, args.seed)
    base, queries = data[:args.n], np.ascontiguousarray(data[args.n:])
    results["generate_s"] = round(time.perf_counter() - t, 1)
    log(f"generated {args.n} + {args.queries} vectors of {args.dim} dims in {results['generate_s']} s")
    t = time.perf_counter()
    _, truth = fi.exact_neighbours(queries, base, 10)
    results["ground_truth_s"] = round(time.perf_counter() - t, 1)
    log(f"exact top-10 of the held-out queries in {results['ground_truth_s']} s")
    model = {"fingerprint": "synthetic", "embedding_dim": args.dim}

    for kind in kinds:
        gc.collect()
        rss0 = rss_bytes()
        t = time.perf_counter()
        index = fi.SearchIndex.build(base, model=model, kind=kind, target_recall=args.target_recall, seed=args.seed)
        total_s = time.perf_counter() - t
        # SearchIndex.build keeps its own normalised copy of the vectors (4 D bytes each): not the index's cost
        rss_index = rss_bytes() - rss0 - index.vectors.nbytes
        entry = {"build_s": round(index.build_seconds, 1), "total_s": round(total_s, 1), "params": dict(index.params),
                 "faiss_bytes": serialized_size(index.faiss_index), "rss_growth_bytes_excl_vectors": int(rss_index),
                 "vectors_bytes": int(index.vectors.nbytes)}
        log(f"{kind}: built in {index.build_seconds:.1f} s ({total_s:.1f} s in all)")
        if kind == "flat":
            entry["latency"] = latency(index, queries[:args.flat_queries], truth[:args.flat_queries])
        else:
            entry["tune_s"] = round(index.tune_seconds, 1)
            entry["tuned"] = {**dict(index.params), "recall_held_out_sample": index.recall["value"]}
            log(f"{kind}: tuned in {entry['tune_s']} s -> {entry['tuned']}")
            entry["latency"] = latency(index, queries, truth)
            key = "efSearch" if kind == "hnsw" else "nprobe"
            tuned_value = index.params[key]
            sweep = [v for v in (fi.HNSW_EF_LADDER if kind == "hnsw" else fi.IVF_NPROBE_LADDER)
                     if v <= max(4 * tuned_value, 64)]
            entry["sweep"] = []
            for v in sweep:
                index.params[key] = v
                entry["sweep"].append({key: v, **latency(index, queries[: min(300, len(queries))],
                                                         truth[: min(300, len(queries))])})
            index.params[key] = tuned_value
        log(f"{kind}: {entry['latency']}")
        results["kinds"][kind] = entry
        del index
        gc.collect()

    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(report(results))
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


def report(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    lines = [(f"{r['settings']['n']:,} vectors x {r['settings']['dim']} dims, {r['settings']['queries']} held-out "
             f"queries, {r['threads']} FAISS threads"),
             "| kind | parameters | build | tune | FAISS structure | recall@10 | median | p99 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, e in r["kinds"].items():
        lat = e["latency"]
        params = ", ".join(f"{k}={v}" for k, v in (e.get("tuned") or e["params"]).items()
                           if k != "recall_held_out_sample")
        lines.append(f"| {kind} | {params or '-'} | {e['build_s']} s | {e.get('tune_s', '-')} s | "
                     f"{mib(e['faiss_bytes'])} | {lat['recall_at_10']} | {lat['median_ms']} ms | {lat['p99_ms']} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
