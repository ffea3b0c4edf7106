"""The embedding endpoint end to end: the real tritonserver (bundled with nvidia-pytriton) started by
`python -m serving.server` on free ports, a real exported encoder (export.onnx, random ResNet-18,
small stem, 32 px), real ONNX Runtime, and the real clients over gRPC and HTTP.

What is proved here: the served models show exactly the exported repository's names, types and
shapes; HTTP and gRPC, tensor and bytes inputs give the embeddings of ONNX Runtime in process and
of PyTorch (to the export tolerance); every kind of bad input gets an error of its own with a
clean message while the server goes on serving, also when the bad request sits in the same
dynamic batch as good ones; metrics; the load generator's tiny mode.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import random
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from serving_util import ROOT, SOURCE, ServerProcess, encode, exported_model, picture

from contract.deployment import DEFAULT_MODEL_NAME, INPUT_UINT8, OUTPUT
from export.onnx import FP32_MAX_ABS, EmbeddingModel, load_source, read_metadata
from export.triton import write_repository
from serving.client import EmbeddingClient, EmbeddingError, ServerUnavailableError
from serving.engine import l2_normalize
from serving.repository import IMAGE_INPUT

SIZE, DIM = 32, 512
MAX_BATCH = 8                # the session server's --max-batch-size
MAX_IMAGE_BYTES = 1_000_000  # and its --max-image-bytes
IMAGE_MODEL = DEFAULT_MODEL_NAME + "_image"
PROTOCOLS = ["grpc", "http"]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def repository(onnx_model, tmp_path_factory):
    """The model repository that export.triton writes: what Triton containers serve in production."""
    repo = tmp_path_factory.mktemp("repo") / "models"
    write_repository(onnx_model, repo, max_batch_size=MAX_BATCH)
    return repo


@pytest.fixture(scope="module")
def reference(onnx_model):
    """PyTorch eager: the same seeded random encoder the export was made from."""
    encoder, _, info = load_source(SOURCE)
    assert info["fingerprint"] == read_metadata(onnx_model)["fingerprint"]
    pre = info["preprocessing"]
    model = EmbeddingModel(encoder, None, pre, "float").eval()

    def embed(pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(pre.normalize(pixels))).numpy()
        return l2_normalize(out) if normalize else out

    embed.pre = pre
    return embed


def _started(server: ServerProcess):
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    """The server on export.triton's repository, as production runs it, with small limits to test."""
    s = _started(ServerProcess(repository, tmp_path_factory.mktemp("server"), "--max-image-bytes", MAX_IMAGE_BYTES,
                               "--max-queue-delay-us", 5000, "--exit-timeout", 5))
    yield s
    code = s.stop()
    leaks = s.leaks()
    assert code == 0 and not leaks, f"exit {code}, left behind: {leaks}\n{s.stderr()[-2000:]}"


@pytest.fixture(scope="module")
def batching_server(onnx_model, tmp_path_factory):
    """Batches of exactly 4: the queue waits up to 3 s for 4 requests, so 4 sent together run as one."""
    s = _started(ServerProcess(onnx_model, tmp_path_factory.mktemp("batching"), "--max-batch-size", 4,
                               "--max-queue-delay-us", 3_000_000, "--exit-timeout", 5))
    yield s
    assert s.stop() == 0 and not s.leaks()


@pytest.fixture(scope="module")
def pictures():
    return [picture(i, size=(44 + 4 * i, 36 + 2 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def pixels(pictures, reference):
    """The pictures through the preprocessing contract's steps 1-3: uint8 [6, 32, 32, 3]."""
    return np.stack([reference.pre(p) for p in pictures])


@pytest.fixture(scope="module")
def local(onnx_model):
    return EmbeddingClient(onnx_model, device="cpu")


def triton(server: ServerProcess, protocol: str):
    """(tritonclient module, client) for the protocol."""
    if protocol == "grpc":
        import tritonclient.grpc as tc
        return tc, tc.InferenceServerClient(server.grpc_url.split("://")[1])
    import tritonclient.http as tc
    return tc, tc.InferenceServerClient(server.http_url.split("://")[1])


def infer(server, protocol, model, name, array, datatype=None, parameters=None):
    tc, client = triton(server, protocol)
    datatype = datatype or {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}.get(array.dtype, "BYTES")
    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return client.infer(model, [inp], parameters=parameters).as_numpy(OUTPUT)


def as_bytes_tensor(items) -> np.ndarray:
    return np.array(list(items), dtype=np.object_).reshape(-1, 1)


# -- the contract a client sees --------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_metadata_and_config_are_the_exported_repositorys(server, repository, protocol):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    exported = text_format.Parse((repository / DEFAULT_MODEL_NAME / "config.pbtxt").read_text(),
                                 model_config_pb2.ModelConfig())
    _, client = triton(server, protocol)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(DEFAULT_MODEL_NAME) and client.is_model_ready(IMAGE_MODEL)
    kw = {"as_json": True} if protocol == "grpc" else {}
    meta = client.get_model_metadata(DEFAULT_MODEL_NAME, **kw)
    inp, out = exported.input[0], exported.output[0]
    assert meta["name"] == exported.name == DEFAULT_MODEL_NAME
    assert meta["platform"] == "onnxruntime_onnx"  # what Triton's onnxruntime backend reports
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == \
        [(inp.name, "UINT8", [-1, *inp.dims])] == [(INPUT_UINT8, "UINT8", [-1, SIZE, SIZE, 3])]
    assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]] == \
        [(out.name, "FP32", [-1, *out.dims])] == [(OUTPUT, "FP32", [-1, DIM])]
    config = client.get_model_config(DEFAULT_MODEL_NAME, **kw)
    config = config.get("config", config)
    assert int(config["max_batch_size"]) == exported.max_batch_size == MAX_BATCH
    assert "dynamic_batching" in config
    image = client.get_model_metadata(IMAGE_MODEL, **kw)
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in image["inputs"]] == \
        [(IMAGE_INPUT, "BYTES", [-1, 1])]
    assert [o["name"] for o in image["outputs"]] == [OUTPUT]
    byolkit = json.loads(config["parameters"]["byolkit"]["string_value"])
    assert byolkit["fingerprint"] == read_metadata(repository / DEFAULT_MODEL_NAME / "1" / "model.onnx")["fingerprint"]


def test_metrics_count_successes_and_failures(server):
    infer(server, "grpc", DEFAULT_MODEL_NAME, INPUT_UINT8, np.zeros((2, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(Exception, match="not a readable image"):
        infer(server, "grpc", IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor([b"not an image"]))
    with urllib.request.urlopen(server.info["metrics"], timeout=10) as r:
        text = r.read().decode()
    ok = [line for line in text.splitlines()
          if line.startswith(f'nv_inference_request_success{{model="{DEFAULT_MODEL_NAME}"')]
    refused = [line for line in text.splitlines()
               if line.startswith(f'byolkit_refused_requests_total{{model="{IMAGE_MODEL}"')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert refused and float(refused[0].split()[-1]) >= 1
    assert "nv_inference_queue_duration_us" in text and "nv_inference_exec_count" in text


# -- the same embeddings everywhere ----------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tensor_and_bytes_inputs_match_onnxruntime_and_pytorch(server, protocol, pictures, pixels, reference,
                                                               local):
    expected = reference(pixels)
    in_process = local.embed(pixels)
    assert np.abs(in_process - expected).max() <= FP32_MAX_ABS
    from_tensor = infer(server, protocol, DEFAULT_MODEL_NAME, INPUT_UINT8, pixels)
    # PNG is lossless: decoded and resized on the server, the pixels are the contract's own
    from_bytes = infer(server, protocol, IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor(encode(p) for p in pictures))
    for got in (from_tensor, from_bytes):
        assert got.shape == (len(pictures), DIM) and got.dtype == np.float32
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert np.abs(got - in_process).max() <= 1e-6  # the same ONNX Runtime computation
        assert np.abs(got - expected).max() <= FP32_MAX_ABS
    # raw on request: the encoder's own output, unnormalised
    raw = infer(server, protocol, DEFAULT_MODEL_NAME, INPUT_UINT8, pixels, parameters={"raw": True})
    assert np.abs(raw - reference(pixels, normalize=False)).max() <= FP32_MAX_ABS
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-2)


def test_bytes_are_decoded_with_exif_and_any_mode(server, pictures, reference, local):
    """EXIF orientation, grayscale, palette, alpha, 16-bit, JPEG and WebP: decoded by the contract."""
    rotated = pictures[1]  # 48 x 38: rotating it changes what the centre crop sees
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned 90 degrees
    jpeg_exif = encode(rotated, "JPEG", quality=95, exif=exif.tobytes())
    items = {"jpeg+exif": jpeg_exif, "gray": encode(pictures[2].convert("L")),
             "palette": encode(pictures[3].convert("P")),
             "rgba": encode(pictures[4].convert("RGBA")), "gray16": encode(pictures[5].convert("I;16")),
             "webp": encode(pictures[0], "WEBP", lossless=True)}
    got = infer(server, "grpc", IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor(items.values()))
    assert np.abs(got - local.embed(list(items.values()))).max() <= 1e-6
    # the server applied the orientation: equal to the upright image's embedding, not the stored one's
    stored = np.asarray(Image.open(io.BytesIO(jpeg_exif)).convert("RGB"))
    upright = np.asarray(Image.open(io.BytesIO(jpeg_exif)).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    e_upright, e_stored = reference(np.stack([reference.pre(Image.fromarray(a)) for a in (upright, stored)]))
    assert np.abs(got[0] - e_upright).max() <= FP32_MAX_ABS
    assert np.abs(got[0] - e_stored).max() > 0.01
    assert np.abs(got[5] - reference(np.stack([reference.pre(pictures[0])]))[0]).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_takes_paths_bytes_pil_and_arrays(server, protocol, pictures, pixels, local, tmp_path):
    paths = []
    for i, p in enumerate(pictures[:3]):
        paths.append(tmp_path / f"p{i}.png")
        paths[-1].write_bytes(encode(p))
    items = [paths[0], str(paths[1]), encode(pictures[2]), pictures[3], np.asarray(pictures[4]), pixels[5],
             encode(pictures[0])]
    expected = local.embed(items)
    assert np.abs(expected[:6] - local.embed(pixels)).max() <= 1e-6
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with EmbeddingClient(url) as client:
        assert client.server_decodes and client.embedding_dim == DIM
        got = client.embed(items, batch_size=3)  # three requests to each model
        assert got.shape == (7, DIM)
        assert np.abs(got - expected).max() <= 1e-6
        assert np.abs(client.embed(items, normalize=False) - local.embed(items, normalize=False)).max() <= 1e-4
        assert client.embed(pixels[:2]).shape == (2, DIM)  # one [N, H, W, 3] array
        with pytest.raises(EmbeddingError, match=r"image 2: .*not a readable image"):
            client.embed([paths[0], paths[1], b"junk", pixels[0]])
        with pytest.raises(EmbeddingError, match=r"image 1: cannot read .*nope.png"):
            client.embed([paths[0], tmp_path / "nope.png"])
    with EmbeddingClient(url, decode="client") as client:  # decoded here, sent as uint8 tensors
        assert not client.server_decodes
        assert np.abs(client.embed(items) - expected).max() <= 1e-6


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_batches_above_the_server_limit_and_names_missing_models(server, protocol, pixels, local):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    many = np.concatenate([pixels] * 3)  # 18 images, batch_size 64: sent in requests of MAX_BATCH
    with EmbeddingClient(url) as client:
        assert client.max_batch_size == MAX_BATCH
        assert np.abs(client.embed(many, batch_size=64) - local.embed(many)).max() <= 1e-6
    with pytest.raises(EmbeddingError, match="serves no model .nope."):
        EmbeddingClient(url, model="nope")


def test_client_gives_up_on_an_unreachable_server_after_its_retries():
    from serving.server import free_port
    port = free_port()
    for url in (f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
            EmbeddingClient(url, retries=2, backoff=0.01)


# -- bad input: an error for that request only, with a clean message -------------------------------
def _bomb() -> bytes:
    """A real PNG of 9000 x 8000 pixels (72 megapixels) that compresses to a few kilobytes."""
    return encode(Image.new("1", (9000, 8000)), optimize=True)


def _truncated_jpeg(pictures) -> bytes:
    data = encode(pictures[0].resize((200, 160)), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD = {  # name -> (model, input, array maker, expected message, HTTP status, gRPC status)
    "corrupt jpeg": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([_truncated_jpeg(p)]),
                     "not a readable image", 400, "INVALID_ARGUMENT"),
    "empty bytes": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([b""]), "empty image (0 bytes)", 400,
                    "INVALID_ARGUMENT"),
    "text file": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([b"name,label\ncat,1\n" * 20]),
                  "not a readable image", 400, "INVALID_ARGUMENT"),
    "decompression bomb": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([_bomb()]),
                           "9000x8000 pixels, above the limit of 64000000", 400, "INVALID_ARGUMENT"),
    "too many bytes": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([encode(p[0]) + bytes(MAX_IMAGE_BYTES)]),
                       f"above the limit of {MAX_IMAGE_BYTES}", 400, "INVALID_ARGUMENT"),
    "one bad image among good": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([encode(p[0]), b"GIF89a..."]),
                                 "image 1 of 2: not a readable image", 400, "INVALID_ARGUMENT"),
    "wrong dtype": (DEFAULT_MODEL_NAME, INPUT_UINT8, lambda p: np.zeros((1, SIZE, SIZE, 3), np.float32),
                    "expects 'UINT8'", 400, "INVALID_ARGUMENT"),
    "wrong shape": (DEFAULT_MODEL_NAME, INPUT_UINT8, lambda p: np.zeros((1, 16, 16, 3), np.uint8),
                    "unexpected shape for input 'images'", 400, "INVALID_ARGUMENT"),
    "missing channel dimension": (DEFAULT_MODEL_NAME, INPUT_UINT8, lambda p: np.zeros((2, SIZE, SIZE), np.uint8),
                           "unexpected shape for input 'images'", 400, "INVALID_ARGUMENT"),
    "pixels to the bytes model": (IMAGE_MODEL, IMAGE_INPUT, lambda p: np.zeros((1, 1), np.uint8),
                                  "expects 'BYTES'", 400, "INVALID_ARGUMENT"),
    "unknown model": ("resnet_classifier", INPUT_UINT8, lambda p: np.zeros((1, SIZE, SIZE, 3), np.uint8),
                      "unknown model: 'resnet_classifier'", 404, "NOT_FOUND"),
    "oversized request": (DEFAULT_MODEL_NAME, INPUT_UINT8, lambda p: np.zeros((MAX_BATCH + 1, SIZE, SIZE, 3), np.uint8),
                          f"batch-size must be <= {MAX_BATCH}", 400, "INVALID_ARGUMENT"),
    "oversized bytes request": (IMAGE_MODEL, IMAGE_INPUT, lambda p: as_bytes_tensor([encode(p[0])] * (MAX_BATCH + 1)),
                                f"batch-size must be <= {MAX_BATCH}", 400, "INVALID_ARGUMENT"),
}


def bad_request(server, protocol, case, pictures):
    from tritonclient.utils import InferenceServerException
    model, name, make, message, http_status, grpc_status = BAD[case]
    with pytest.raises(InferenceServerException) as e:
        infer(server, protocol, model, name, make(pictures))
    return e.value, message, http_status, grpc_status


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_own_clean_error(server, protocol, case, pictures, pixels, local):
    error, message, http_status, grpc_status = bad_request(server, protocol, case, pictures)
    assert message in error.message()
    assert "Traceback" not in error.message() and "\n" not in error.message().strip()
    assert str(error.status()) == (str(http_status) if protocol == "http" else f"StatusCode.{grpc_status}")
    # and the server goes on serving
    got = infer(server, protocol, DEFAULT_MODEL_NAME, INPUT_UINT8, pixels[:2])
    assert np.abs(got - local.embed(pixels[:2])).max() <= 1e-6


def test_raw_parameter_of_the_wrong_type_is_refused(server, pixels):
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException, match="parameter 'raw' must be a boolean"):
        infer(server, "http", DEFAULT_MODEL_NAME, INPUT_UINT8, pixels[:1], parameters={"raw": "yes"})


def test_bad_requests_among_concurrent_good_ones(server, pictures, pixels, local):
    """48 requests from 8 threads over both protocols, a third of them bad: every good one succeeds."""
    from tritonclient.utils import InferenceServerException
    expected_tensor, expected_bytes = local.embed(pixels), local.embed([encode(p) for p in pictures])
    png = [encode(p) for p in pictures]
    jobs = []
    for i in range(32):
        k = i % len(pictures)
        if i % 2:
            jobs.append(("good", DEFAULT_MODEL_NAME, INPUT_UINT8, pixels[k:k + 2], expected_tensor[k:k + 2]))
        else:
            jobs.append(("good", IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor(png[k:k + 2]), expected_bytes[k:k + 2]))
    cases = [c for c in BAD if c not in ("decompression bomb",)]  # the bomb is slow to build, once is enough
    jobs += [("bad", case, None, None, None) for case in cases + cases[:4]]
    random.Random(0).shuffle(jobs)

    def run(job_and_index):
        i, (kind, model, name, array, expected) = job_and_index
        protocol = PROTOCOLS[i % 2]
        if kind == "bad":
            case = model
            bad_model, bad_name, make, message, _, _ = BAD[case]
            try:
                infer(server, protocol, bad_model, bad_name, make(pictures))
            except InferenceServerException as e:
                return message in e.message()
            return False
        got = infer(server, protocol, model, name, array)
        return got.shape == expected.shape and np.abs(got - expected).max() <= 1e-6

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, enumerate(jobs)))
    failed = [(job[0], job[1]) for job, ok in zip(jobs, results) if not ok]
    assert not failed


def test_a_bad_request_in_the_same_dynamic_batch_fails_alone(batching_server, pictures, local):
    """Four requests that Triton batches into one execution: the bad ones fail, the good ones do not."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException
    client = tc.InferenceServerClient(batching_server.grpc_url.split("://")[1])

    def executions(model):
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))

    def executions_after(model, before):
        """Triton may answer a request before it counts the execution: wait for the count to move
        (bounded), then once more, so that a second execution still arriving would show."""
        deadline = time.monotonic() + 10
        while executions(model)[0] == before[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return executions(model)

    png = [encode(p) for p in pictures[:2]]
    requests = [("grpc", [png[0]]), ("http", [b"\x89PNG\r\n\x1a\n broken"]), ("grpc", [png[1]]), ("http", [b""])]
    before = executions(IMAGE_MODEL)

    def run(item):
        protocol, data = item
        try:
            return infer(batching_server, protocol, IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor(data))
        except InferenceServerException as e:
            return e.message()

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, requests))
    after = executions_after(IMAGE_MODEL, before)
    assert after[0] - before[0] == 1, "the four requests were not one dynamic batch"
    assert np.abs(results[0] - local.embed([png[0]])).max() <= 1e-6
    assert np.abs(results[2] - local.embed([png[1]])).max() <= 1e-6
    assert results[1].startswith("not a readable image")
    assert results[3] == "empty image (0 bytes)"

    # the tensor model: a request with an invalid parameter in a batch with three good ones
    pix = np.stack([local.preprocessing(p) for p in pictures[:4]])
    before = executions(DEFAULT_MODEL_NAME)

    def run_tensor(i):
        try:
            return infer(batching_server, "grpc", DEFAULT_MODEL_NAME, INPUT_UINT8, pix[i:i + 1],
                         parameters={"raw": "please"} if i == 2 else None)
        except InferenceServerException as e:
            return e.message()

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_tensor, range(4)))
    assert executions_after(DEFAULT_MODEL_NAME, before)[0] - before[0] == 1
    assert results[2] == "parameter 'raw' must be a boolean, got 'please'"
    for i in (0, 1, 3):
        assert np.abs(results[i] - local.embed(pix[i:i + 1])).max() <= 1e-6


# -- a float export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_server(tmp_path_factory):
    """The same encoder exported with the float input (`pixel_values`, normalised by the client)."""
    from export.onnx import export_onnx
    tmp = tmp_path_factory.mktemp("float")
    export_onnx(SOURCE, tmp / "float.onnx", input_kind="float", exporter="torchscript")  # the fast exporter
    s = _started(ServerProcess(tmp / "float.onnx", tmp, "--exit-timeout", 5))
    yield s
    assert s.stop() == 0 and not s.leaks()


def test_a_float_export_is_served_with_its_own_input(float_server, pictures, pixels, reference, local):
    _, client = triton(float_server, "grpc")
    meta = client.get_model_metadata(DEFAULT_MODEL_NAME, as_json=True)
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == \
        [("pixel_values", "FP32", [-1, 3, SIZE, SIZE])]
    expected = local.embed(pixels)  # the uint8 export of the same weights
    got = infer(float_server, "http", DEFAULT_MODEL_NAME, "pixel_values", reference.pre.normalize(pixels))
    assert np.abs(got - expected).max() <= FP32_MAX_ABS
    from_bytes = infer(float_server, "grpc", IMAGE_MODEL, IMAGE_INPUT, as_bytes_tensor(encode(p) for p in pictures))
    assert np.abs(from_bytes - expected).max() <= FP32_MAX_ABS
    with EmbeddingClient(float_server.grpc_url, decode="client") as c:  # normalises here, sends float32
        assert np.abs(c.embed([pictures[0], pixels[1]]) - expected[:2]).max() <= FP32_MAX_ABS
    from tritonclient.utils import InferenceServerException
    bad = reference.pre.normalize(pixels[:2])
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="'pixel_values' holds NaN or infinite values"):
        infer(float_server, "grpc", DEFAULT_MODEL_NAME, "pixel_values", bad)


# -- the load generator ------------------------------------------------------------------------------
def test_load_generator_tiny_mode(server, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "benchmarks/serving_load.py", "--url", server.grpc_url, "--url",
                           server.http_url, "--concurrency", "1", "4", "--duration", "1", "--warmup", "0.2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [("grpc", 1), ("grpc", 4), ("http", 1), ("http", 4)]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows), rows
    assert "| grpc | tensor | on | 4 |" in proc.stdout
    refused = subprocess.run([sys.executable, "benchmarks/serving_load.py", "--url", "grpc://10.1.2.3:8001"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "only targets localhost" in refused.stderr
