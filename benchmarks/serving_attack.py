"""The embedding server under attack: a mixed load with bad requests interleaved, memory after
refused oversize requests, and kill -9 of each of its processes (the figures of BENCHMARKS.md,
"Reliability").

    python benchmarks/serving_attack.py --model model.onnx --json benchmarks/results/serving_attack.json
    python benchmarks/serving_attack.py --model model.onnx --duration 2 --oversize-mib 8   # a quick look

1. Mixed load: --threads client threads for --duration seconds over gRPC and HTTP, tensor and
   encoded-image requests, every answer compared with ONNX Runtime in this process (max abs
   difference 1e-6), and one request in --bad-every a bad one from the catalogue below (each must
   be refused with a one-line message, the server serving on). Reported: good requests answered
   and failed, bad requests refused cleanly and not.
2. Memory: the server's process tree (sum of proportional set sizes: shared memory counted once)
   before and after 10 refused requests of --oversize-mib MiB each (HTTP and gRPC in turn; above
   the server's default --max-request-bytes of 64 MiB, its front refuses them before holding
   them), and its shared memory.
3. kill -9: of a backend stub, then (on a fresh server) of tritonserver: seconds until the server
   process exits, until /v2/health/ready stops answering 200, its exit status, processes left.

Localhost only: it starts its own servers (python -m serving.server) on free ports.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import http.client
import json
import os
import platform
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serving_util import ServerProcess, alive, encode, picture, png_header, tree_pss_mib

from serving.client import EmbeddingClient
from serving.server import workspace_root

MODEL, IMAGE_MODEL = "byol_encoder", "byol_encoder_image"
MAX_IMAGE_BYTES = 1_000_000


def shm_mib(pid: int) -> float:
    return sum(f.stat().st_blocks * 512 for f in Path("/dev/shm").glob(f"byolkit_{pid}_*")) / 2**20


def _client(server, protocol):
    if protocol == "grpc":
        import tritonclient.grpc as tc
        return tc, tc.InferenceServerClient(server.grpc_url.split("://")[1])
    import tritonclient.http as tc
    return tc, tc.InferenceServerClient(server.http_url.split("://")[1], network_timeout=60)


def _infer(tc, client, model, name, array, datatype, parameters=None):
    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return client.infer(model, [inp], parameters=parameters).as_numpy("embeddings")


def _raw_http(server, payload: bytes, read_timeout: float = 10) -> str:
    """Bytes straight onto the HTTP port -> the status line, or what happened."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=read_timeout) as s:
        s.sendall(payload)
        try:
            return s.recv(200).split(b"\r\n", 1)[0].decode("latin-1") or "closed"
        except TimeoutError:
            return "no answer"


def bad_catalogue(server, size: int) -> dict:
    """name -> a callable that sends the bad request and returns True when it was refused cleanly."""
    from tritonclient.utils import InferenceServerException

    def refused(protocol, model, name, array, datatype, parameters=None):
        tc, client = _client(server, protocol)
        try:
            _infer(tc, client, model, name, array, datatype, parameters)
        except InferenceServerException as e:
            return "Traceback" not in e.message() and "\n" not in e.message().strip()
        return False

    def obj(items):
        return np.array(items, dtype=np.object_).reshape(-1, 1)

    png = encode(picture(1))
    good = np.zeros((1, size, size, 3), np.uint8)
    json_300 = json.dumps({"inputs": [{"name": "images", "shape": [1, size, size, 3], "datatype": "UINT8",
                                       "data": [300] * (size * size * 3)}]}).encode()
    cases = {}
    for p in ("grpc", "http"):
        cases |= {
            f"{p} corrupt": lambda p=p: refused(p, IMAGE_MODEL, "image_bytes", obj([png[: len(png) // 2]]), "BYTES"),
            f"{p} empty": lambda p=p: refused(p, IMAGE_MODEL, "image_bytes", obj([b""]), "BYTES"),
            f"{p} text": lambda p=p: refused(p, IMAGE_MODEL, "image_bytes", obj([b"a,b\n1,2\n" * 30]), "BYTES"),
            f"{p} bomb header": lambda p=p: refused(p, IMAGE_MODEL, "image_bytes", obj([png_header(20000, 20000)]),
                                                    "BYTES"),
            f"{p} too many bytes": lambda p=p: refused(p, IMAGE_MODEL, "image_bytes",
                                                       obj([png + bytes(MAX_IMAGE_BYTES)]), "BYTES"),
            f"{p} wrong dtype": lambda p=p: refused(p, MODEL, "images", good.astype(np.float32), "FP32"),
            f"{p} wrong shape": lambda p=p: refused(p, MODEL, "images", good[:, :8], "UINT8"),
            f"{p} unknown model": lambda p=p: refused(p, "nope", "images", good, "UINT8"),
            f"{p} batch above the limit": lambda p=p: refused(p, MODEL, "images", np.repeat(good, 65, 0), "UINT8"),
            f"{p} raw not a boolean": lambda p=p: refused(p, MODEL, "images", good, "UINT8", {"raw": "yes"}),
        }
    post = "POST /v2/models/byol_encoder/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"

    def raw(name, payload, expected: str, read_timeout=10):
        """Bytes straight onto the HTTP port (what byolkit's front answers, before tritonserver sees them):
        refused cleanly when the status line is the expected one; every answer is recorded."""
        answer = _raw_http(server, payload, read_timeout)
        RAW_ANSWERS.setdefault(name, set()).add(answer)
        return answer.startswith(f"HTTP/1.1 {expected} ")

    cases |= {
        "http invalid json": lambda: raw("invalid JSON", post.format(9).encode() + b"{not json", "400"),
        "http uint8 300 in json": lambda: raw("uint8 300 in JSON", post.format(len(json_300)).encode() + json_300,
                                              "400"),
        "http hang up mid-body": lambda: raw(f"half-sent body (read timeout {READ_TIMEOUT_S} s)",
                                             post.format(100_000).encode() + b'{"inputs"', "408",
                                             read_timeout=READ_TIMEOUT_S + 10),
    }
    return cases


RAW_ANSWERS: dict[str, set] = {}  # the status lines answered to the raw HTTP cases
READ_TIMEOUT_S = 2  # the server's --read-timeout here


def mixed_load(server, model_path: Path, threads: int, duration: float, bad_every: int) -> dict:
    local = EmbeddingClient(model_path, device="cpu")
    size = local.preprocessing.input_size
    pictures = [picture(i, size=(40 + 3 * i, 36 + 2 * i)) for i in range(8)]
    pngs = [encode(p) for p in pictures]
    pixels = np.stack([local.preprocessing(p) for p in pictures])
    expected_pixels, expected_png = local.embed(pixels), local.embed(pngs)
    bad = bad_catalogue(server, size)
    names = sorted(bad)
    stats = {"good": 0, "good_failed": 0, "bad": 0, "bad_not_clean": 0, "failures": []}
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def worker(seed: int):
        rng = random.Random(seed)
        clients = {p: _client(server, p) for p in ("grpc", "http")}
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if n % bad_every == 0:
                name = names[rng.randrange(len(names))]
                ok = bad[name]()
                with lock:
                    stats["bad"] += 1
                    if not ok:
                        stats["bad_not_clean"] += 1
                        stats["failures"].append(f"bad: {name}")
                continue
            protocol, k = rng.choice(("grpc", "http")), rng.randrange(len(pictures) - 1)
            tc, client = clients[protocol]
            try:
                if rng.random() < 0.5:
                    got = _infer(tc, client, MODEL, "images", pixels[k:k + 2], "UINT8")
                    want = expected_pixels[k:k + 2]
                else:
                    got = _infer(tc, client, IMAGE_MODEL, "image_bytes",
                                 np.array(pngs[k:k + 2], dtype=np.object_).reshape(-1, 1), "BYTES")
                    want = expected_png[k:k + 2]
                ok = got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-6
                why = "" if ok else f"max diff {float(np.abs(got - want).max())}"
            except Exception as e:  # noqa: BLE001 - a good request that failed is what is counted
                ok, why = False, f"{type(e).__name__}: {str(e)[:200]}"
            with lock:
                stats["good"] += 1
                if not ok:
                    stats["good_failed"] += 1
                    stats["failures"].append(f"good {protocol}: {why}")

    start = time.monotonic()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    stats["seconds"] = round(time.monotonic() - start, 1)
    stats["failures"] = stats["failures"][:10]
    return stats


def oversize(server, mib: int, count: int = 10) -> dict:
    from tritonclient.utils import InferenceServerException
    big = np.array([encode(picture(0)) + bytes(mib * 2**20)], dtype=np.object_).reshape(1, 1)
    before, shm_before = tree_pss_mib(server.proc.pid), shm_mib(server.proc.pid)
    refused = 0
    for i in range(count):
        tc, client = _client(server, ("grpc", "http")[i % 2])
        try:
            _infer(tc, client, IMAGE_MODEL, "image_bytes", big, "BYTES")
        except InferenceServerException as e:  # the front's 413 (HTTP), gRPC's own RESOURCE_EXHAUSTED
            refused += "above the limit" in e.message() or "larger than max" in e.message()
    time.sleep(2)
    return {"payload_mib": mib, "requests": count, "refused": refused, "pss_before_mib": round(before),
            "pss_after_mib": round(tree_pss_mib(server.proc.pid)), "shm_before_mib": round(shm_before, 1),
            "shm_after_mib": round(shm_mib(server.proc.pid), 1)}


def kill_test(model_path: Path, tmp: Path, victim: str, probe_interval: float) -> dict:
    server = ServerProcess(model_path, tmp, "--probe-interval", probe_interval).start()
    try:
        tree = server.tree
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in tree}
        pid = next(p for p in tree if (b"python_backend_stub" in names[p]) == (victim == "backend stub"))
        ready_until = [None]

        def watch_ready():
            while server.proc.poll() is None:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=1)
                    c.request("GET", "/v2/health/ready")
                    if c.getresponse().status != 200:
                        break
                except OSError:
                    break
                time.sleep(0.05)
            ready_until[0] = time.monotonic()

        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        watcher = threading.Thread(target=watch_ready, daemon=True)
        watcher.start()
        code = server.proc.wait(60)
        exited = time.monotonic() - start
        watcher.join(5)
        time.sleep(0.5)
        left = [p for p in tree if alive(p)]
        return {"victim": victim, "exit_status": code, "exit_s": round(exited, 2),
                "ready_dropped_s": round(ready_until[0] - start, 2) if ready_until[0] else None,
                "processes_left": len(left), "leaks": server.leaks(1), "probe_interval_s": probe_interval}
    finally:
        server.stop(signal.SIGKILL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported ONNX file (python -m export.onnx)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--bad-every", type=int, default=4, help="one request in N is a bad one (default 4)")
    p.add_argument("--oversize-mib", type=int, default=64, help="size of each refused request (default 64)")
    p.add_argument("--probe-interval", type=float, default=5.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model = Path(args.model)
    if not model.is_file():
        print(f"error: no ONNX file at {model}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="serving-attack-"))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "argv": sys.argv[1:]}
    server = ServerProcess(model, tmp, "--max-image-bytes", MAX_IMAGE_BYTES, "--read-timeout", READ_TIMEOUT_S,
                           "--probe-interval", args.probe_interval).start()
    try:
        result["memory"] = oversize(server, args.oversize_mib)
        result["load"] = mixed_load(server, model, args.threads, args.duration, args.bad_every)
        result["memory_after_load"] = oversize(server, args.oversize_mib)
    finally:
        result["stop_status"] = server.stop()
        result["leaks"] = server.leaks()
    result["raw_http_answers"] = {k: sorted(v) for k, v in RAW_ANSWERS.items()}
    result["kill"] = [kill_test(model, tmp, v, args.probe_interval) for v in ("backend stub", "tritonserver")]
    result["workspace_root"] = str(workspace_root())
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    load = result["load"]
    ok = load["good_failed"] == 0 and load["bad_not_clean"] == 0 and all(k["exit_status"] == 1 for k in result["kill"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
