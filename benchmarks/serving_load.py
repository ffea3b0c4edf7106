"""Load test of the embedding endpoint: throughput, latency percentiles and errors under concurrency.

    # start a server on free local ports, load it over gRPC and HTTP at concurrency 1, 8 and 32
    # (30 s each), then compare dynamic batching on and off at concurrency 32
    python benchmarks/serving_load.py --serve model.onnx --json benchmarks/results/serving_load.json

    # load a server that is already running (localhost only)
    python benchmarks/serving_load.py --url grpc://127.0.0.1:8001 --url http://127.0.0.1:8000 --concurrency 8

A bounded, closed-loop load generator (Triton's perf_analyzer has no working PyPI build for this
Python): each of C workers sends one request, waits for the answer and sends the next, for
--duration seconds after --warmup seconds not counted, over tritonclient's asyncio gRPC and HTTP
clients in this one process. A request is one image (--images-per-request to change), random
uint8 pixels for the tensor model, or an encoded PNG for `<model>_image` (--input bytes). It
targets localhost only, and stops at the deadline whatever the server does (a request timeout
of 30 s bounds every call).

Reported per run: requests/s, images/s, latency p50/p95/p99 in ms, errors (must be 0) with
the first messages, the load average. With --serve, a second server with --no-dynamic-batching
runs next to the first one, and after the protocol/concurrency matrix the two are compared at
--compare-concurrency in alternating rounds (on, off, on, off, ...; --duration in all for each),
so that other work on a shared machine weighs on both alike.

With --versus OTHER (e.g. the int8 export of the same encoder), the second server serves OTHER with
the same settings instead, and the comparison is MODEL against OTHER under the same load:

    python benchmarks/serving_load.py --serve model.onnx --versus model-int8.onnx --concurrency 8 32
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.deployment import DEFAULT_MODEL_NAME, OUTPUT
from serving.repository import IMAGE_INPUT, image_model_name

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
REQUEST_TIMEOUT_S = 30.0


def check_local(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "http"):
        raise ValueError(f"{url}: expected grpc://HOST:PORT or http://HOST:PORT")
    if parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{url}: this load generator only targets localhost ({', '.join(sorted(LOCAL_HOSTS))})")
    return parts.scheme, parts.netloc


def _payload(kind: str, size: int, images: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "tensor":
        return rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    from PIL import Image
    items = []
    for _ in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)).save(buf, "PNG")
        items.append(buf.getvalue())
    return np.array(items, dtype=np.object_).reshape(-1, 1)


async def _load(url: str, model: str, kind: str, input_name: str, size: int, images: int, concurrency: int,
                duration: float, warmup: float) -> dict:
    scheme, address = check_local(url)
    if scheme == "grpc":
        import tritonclient.grpc as tc
        from tritonclient.grpc import aio
        client = aio.InferenceServerClient(address)
        extra = {"client_timeout": REQUEST_TIMEOUT_S}
    else:
        import tritonclient.http as tc
        from tritonclient.http import aio
        client = aio.InferenceServerClient(address, conn_limit=max(concurrency, 1),
                                           conn_timeout=REQUEST_TIMEOUT_S)
        extra = {"timeout": int(REQUEST_TIMEOUT_S)}
    name = model if kind == "tensor" else image_model_name(model)
    latencies, errors, messages = [], 0, []
    start = time.perf_counter()
    measure_from, deadline = start + warmup, start + warmup + duration

    async def worker(seed: int):
        nonlocal errors
        array = _payload(kind, size, images, seed)
        inp = tc.InferInput(input_name if kind == "tensor" else IMAGE_INPUT, list(array.shape),
                            "UINT8" if kind == "tensor" else "BYTES")
        inp.set_data_from_numpy(array)
        outputs = [tc.InferRequestedOutput(OUTPUT)]
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                result = await client.infer(name, [inp], outputs=outputs, **extra)
                ok = result.as_numpy(OUTPUT).shape[0] == images
                error = None if ok else "wrong number of embeddings"
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                error = f"{type(e).__name__}: {e}"
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= deadline:
                if error is None:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
                    if len(messages) < 3:
                        messages.append(error[:300])

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return {"protocol": scheme, "model": name, "input": kind, "concurrency": concurrency, "duration_s": duration,
            "images_per_request": images, "latencies": latencies, "errors": errors, "error_messages": messages}


def summarise(parts: list[dict]) -> dict:
    """One or more runs of the same setting (rounds) -> one result row."""
    latencies = [t for p in parts for t in p["latencies"]]
    duration = sum(p["duration_s"] for p in parts)
    lat = np.asarray(latencies) * 1000
    row = {k: v for k, v in parts[0].items() if k != "latencies"}
    row.update(duration_s=duration, rounds=len(parts), requests=len(latencies), errors=sum(p["errors"] for p in parts),
               error_messages=[m for p in parts for m in p["error_messages"]][:3],
               requests_per_s=round(len(latencies) / duration, 2),
               images_per_s=round(len(latencies) * row["images_per_request"] / duration, 2),
               **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if len(lat) else None for q in (50, 95, 99)},
               load_average=[round(v, 2) for v in os.getloadavg()])
    return row


def load(url, **kw) -> dict:
    return asyncio.run(_load(url, **kw))


def model_facts(url: str, model: str) -> tuple[str, int]:
    """(tensor input name, input size) from the server's model metadata."""
    scheme, address = check_local(url)
    if scheme == "grpc":
        import tritonclient.grpc as tc
        meta = tc.InferenceServerClient(address).get_model_metadata(model, as_json=True)
    else:
        import tritonclient.http as tc
        meta = tc.InferenceServerClient(address).get_model_metadata(model)
    inp = meta["inputs"][0]
    if inp["datatype"] != "UINT8":
        raise ValueError(f"{model} takes {inp['datatype']} {inp['name']}; this load test sends uint8 images "
                         "(export with --input uint8, or use --input bytes)")
    return inp["name"], int(inp["shape"][1])


def table(rows: list[dict]) -> str:
    head = "| served | protocol | model input | dynamic batching | concurrency | requests/s | images/s | p50 ms | " \
           "p95 ms | p99 ms | errors | load avg |\n" + "| --- " * 12 + "|\n"
    return head + "\n".join(
        f"| {Path(r.get('served') or '-').name} | {r['protocol']} | {r['input']} | "
        f"{'on' if r.get('dynamic_batching', True) else 'off'} | "
        f"{r['concurrency']} | {r['requests_per_s']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
        f"{r['p99_ms']} | {r['errors']} | {r['load_average'][0]} |" for r in rows)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/serving_load.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--serve", metavar="MODEL", help="start serving.server on MODEL (ONNX file or repository) "
                                                         "on free local ports for the run")
    where.add_argument("--url", action="append", help="a running server: grpc://127.0.0.1:PORT or "
                                                      "http://127.0.0.1:PORT (repeatable; localhost only)")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="served model name (default %(default)s)")
    p.add_argument("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc", "http"],
                   help="with --serve: which endpoints to load (default both)")
    p.add_argument("--input", choices=["tensor", "bytes"], default="tensor",
                   help="tensor: uint8 pixels to MODEL (default); bytes: encoded PNGs to MODEL_image")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="default 1 8 32")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per run (default 30)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run (default 3)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--compare-concurrency", type=int, default=32,
                   help="with --serve: concurrency of the dynamic batching on/off comparison (0: skip)")
    p.add_argument("--compare-rounds", type=int, default=3,
                   help="the comparison alternates on and off in this many rounds of duration/rounds each "
                        "(default 3)")
    p.add_argument("--versus", metavar="OTHER",
                   help="with --serve: compare MODEL against OTHER (e.g. its int8 export) at --compare-concurrency, "
                        "both served with dynamic batching, instead of dynamic batching on against off")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="with --serve: extra serving.server settings, e.g. --server-arg max_queue_delay_us=5000")
    p.add_argument("--json", metavar="PATH", help="write every result and the settings to this JSON file")
    return p


def _serve(model: str, dynamic_batching: bool, server_args: list[str]):
    from serving.repository import ServingSettings
    from serving.server import EmbeddingServer, free_port
    settings = ServingSettings(dynamic_batching=dynamic_batching)
    for item in server_args:
        key, _, value = item.partition("=")
        if not hasattr(settings, key):
            raise ValueError(f"--server-arg {item}: no setting {key!r}")
        setattr(settings, key, type(getattr(settings, key) or 0)(value))
    ports = [free_port() for _ in range(3)]
    return EmbeddingServer(model, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                           settings=settings, log=open(os.devnull, "w"))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.duration <= 0 or args.warmup < 0 or args.images_per_request < 1 \
            or args.compare_rounds < 1:
        print("error: concurrency and images per request must be at least 1, duration positive", file=sys.stderr)
        return 2
    try:
        for url in args.url or []:
            check_local(url)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.versus and not args.serve:
        print("error: --versus needs --serve", file=sys.stderr)
        return 2
    rows = []

    def run(url: str, concurrency: int, duration: float) -> dict:
        input_name, size = model_facts(url, args.model)
        return load(url, model=args.model, kind=args.input, input_name=input_name, size=size,
                    images=args.images_per_request, concurrency=concurrency, duration=duration, warmup=args.warmup)

    def record(row: dict, batching: bool, served: str | None = None):
        row["dynamic_batching"] = batching
        if served:
            row["served"] = served
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.url:
        for url in args.url:
            for c in args.concurrency:
                record(summarise([run(url, c, args.duration)]), True)
    else:
        with contextlib.ExitStack() as stack:
            on = stack.enter_context(_serve(args.serve, True, args.server_arg))
            off = stack.enter_context(_serve(args.versus or args.serve, bool(args.versus), args.server_arg)) \
                if args.compare_concurrency or args.versus else None
            url = {s: {"grpc": s.grpc_url, "http": s.http_url} for s in (on, off) if s is not None}
            for proto in args.protocols:
                for c in args.concurrency:
                    record(summarise([run(url[on][proto], c, args.duration)]), True, args.serve)
                    if args.versus:
                        record(summarise([run(url[off][proto], c, args.duration)]), True, args.versus)
            if off is not None:
                # on and off in alternating rounds, both servers resident: a background load on this
                # shared machine hits both alike
                c, rounds = args.compare_concurrency, args.compare_rounds
                for proto in args.protocols:
                    parts = {True: [], False: []}
                    for _ in range(rounds):
                        for batching, server in ((True, on), (False, off)):
                            parts[batching].append(run(url[server][proto], c, args.duration / rounds))
                    for first in (True, False):
                        row = summarise(parts[first])
                        row["comparison"] = True
                        if args.versus:
                            record(row, True, args.serve if first else args.versus)
                        else:
                            record(row, first)
    print(table(rows))
    if args.versus and args.compare_concurrency:
        for proto in args.protocols:
            pair = {r["served"]: r for r in rows if r["protocol"] == proto and r.get("comparison")}
            if len(pair) == 2 and pair[args.serve]["images_per_s"]:
                ratio = pair[args.versus]["images_per_s"] / pair[args.serve]["images_per_s"]
                print(f"{proto}: {args.versus} / {args.serve} images/s at concurrency {args.compare_concurrency}: "
                      f"{ratio:.2f}x")
    elif not args.url and args.compare_concurrency:
        for proto in args.protocols:
            pair = {r["dynamic_batching"]: r for r in rows if r["protocol"] == proto and r.get("comparison")}
            if True in pair and False in pair and pair[False]["images_per_s"]:
                ratio = pair[True]["images_per_s"] / pair[False]["images_per_s"]
                print(f"{proto}: dynamic batching on/off at concurrency {args.compare_concurrency}: {ratio:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
            "command": " ".join(sys.argv), "settings": vars(args), "results": rows}, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
