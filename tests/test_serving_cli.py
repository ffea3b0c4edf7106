"""`python -m serving.server`: its help, bad command lines (one `error:` line, exit 2, before any
server starts), and shutdown: SIGINT (also when started with SIGINT ignored, as `cmd &` in a
script leaves it) and SIGTERM stop it cleanly, leaving no process, shared memory or workspace;
a server whose parent was killed goes with it, and its workspace is removed at the next start.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from serving_util import ENV, ROOT, ServerProcess, alive, encode, exported_model, picture

from serving import server as srv
from serving.client import EmbeddingClient


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return exported_model(tmp_path_factory)


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, "-m", "serving.server", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0
    for flag in ("--model", "--model-name", "--host", "--http-port", "--grpc-port", "--metrics-port",
                 "--max-batch-size", "--max-queue-delay-us", "--no-dynamic-batching", "--instances", "--device",
                 "--threads", "--max-pixels", "--max-image-bytes", "--max-queue-size", "--probe-interval",
                 "--no-image-model", "--exit-timeout", "--verbose"):
        assert flag in proc.stdout
    for words in ("NAME_image", "image_bytes", "raw=true", "SIGTERM", "127.0.0.1", "/metrics", "export.triton"):
        assert words in proc.stdout


def _no_metadata_onnx(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["embeddings"])], "plain",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), path)
    return path


def _bad_cases(tmp: Path, model: Path) -> dict:
    text = tmp / "notes.onnx"
    text.write_text("not a model\n")
    empty_repo = tmp / "empty_repo"
    (empty_repo / "something").mkdir(parents=True)
    from export.triton import write_repository
    mismatch = tmp / "mismatch"
    write_repository(model, mismatch)
    cfg = next(mismatch.glob("*/config.pbtxt"))
    cfg.write_text(cfg.read_text().replace("512", "128"))
    return {
        "no model": ([], "the following arguments are required: --model"),
        "missing file": (["--model", tmp / "nope.onnx"], "no such file or directory"),
        "text file": (["--model", text], "is not a loadable ONNX model"),
        "foreign onnx": (["--model", _no_metadata_onnx(tmp / "plain.onnx")], "carries no byolkit metadata"),
        "not a repository": (["--model", empty_repo], "no model repository"),
        "config does not match the model": (["--model", mismatch], "does not match its model.onnx"),
        "unknown model in repository": (["--model", mismatch, "--model-name", "other"], "has no model 'other'"),
        "port out of range": (["--model", model, "--http-port", "70000"], "not a port number: 70000"),
        "port not a number": (["--model", model, "--grpc-port", "eighty"], "not an integer: 'eighty'"),
        "same ports": (["--model", model, "--http-port", "9100", "--grpc-port", "9100"], "ports must differ"),
        "no instances": (["--model", model, "--instances", "0"], "must be at least 1, got 0"),
        "negative delay": (["--model", model, "--max-queue-delay-us", "-5"], "must be 0 or more, got -5"),
        "unknown device": (["--model", model, "--device", "tpu"], "unknown device 'tpu'"),
        "bad cuda index": (["--model", model, "--device", "cuda:x"], "device cuda:x"),
    }


def test_bad_command_lines_give_one_error_line_and_status_2(onnx_model, tmp_path, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for name, (argv, message) in _bad_cases(tmp_path, onnx_model).items():
        try:
            code = srv.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, name
        lines = [line for line in err.splitlines() if line.startswith("error:") or "error: " in line]
        assert len(lines) == 1 and message in lines[0], (name, err)
        assert "Traceback" not in err, name
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


def test_a_port_in_use_is_an_error_before_starting(onnx_model):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "serving.server", "--model", str(onnx_model),
                               "--grpc-port", str(port), "--http-port", str(srv.free_port()),
                               "--metrics-port", str(srv.free_port())],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --grpc-port {port}: port {port} on 127.0.0.1 is already in use"


def _embeds(url: str, retries: int = 0) -> EmbeddingClient:
    client = EmbeddingClient(url, retries=retries, backoff=0.2)
    vectors = client.embed([encode(picture(0)), np.zeros((32, 32, 3), np.uint8)])
    assert vectors.shape == (2, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    return client


def test_sigint_stops_it_cleanly_even_when_started_with_sigint_ignored(onnx_model, tmp_path):
    server = ServerProcess(onnx_model, tmp_path, "--instances", 2, ignore_sigint=True)
    try:
        server.start()
        assert len(server.tree) >= 4  # tritonserver and its backend stubs: 2 + 1 instances
        segments = list(Path("/dev/shm").glob(f"byolkit_{server.proc.pid}_*"))
        assert segments  # the python backend's shared memory, under this server's prefix
        _embeds(server.grpc_url)
        assert server.stop(signal.SIGINT, timeout=60) == 0
    finally:
        server.stop(signal.SIGKILL)
    assert not server.leaks()
    err = server.stderr()
    assert "stopped (tritonserver exit status 0)" in err and "warning" not in err


def test_sigterm_stops_it_cleanly_and_the_client_retries_while_it_starts(onnx_model, tmp_path):
    server = ServerProcess(onnx_model, tmp_path, "--no-image-model", "--exit-timeout", 3)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            # the client is created before the server can answer: it retries until it can
            early = pool.submit(_embeds, f"http://127.0.0.1:{server.http_port}", retries=40)
            server.start()
            client = early.result(timeout=120)
        assert client.remote.retried > 0 and not client.server_decodes
        # the HTTP client keeps its connection open (keep-alive) while the server stops: the front closes it,
        # so tritonserver need not wait the exit timeout for it (before the front it did, then exited
        # without unloading) and stops cleanly
        assert server.stop(signal.SIGTERM, timeout=60) == 0
        assert client.remote.client is not None
    finally:
        server.stop(signal.SIGKILL)
    assert not server.leaks()
    err = server.stderr()
    assert "stopped (tritonserver exit status 0)" in err
    assert "warning" not in err


def test_a_killed_server_takes_tritonserver_with_it_and_is_cleaned_up_at_the_next_start(onnx_model, tmp_path):
    server = ServerProcess(onnx_model, tmp_path, "--no-image-model")
    try:
        server.start()
        pid = server.proc.pid
        assert list(srv.workspace_root().glob(f"ws-{pid}-*"))
        os.kill(pid, signal.SIGKILL)  # no chance to clean up
        server.proc.wait(30)
        deadline = time.monotonic() + 60
        while any(alive(p) for p in server.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in server.tree if alive(p)]  # tritonserver and its stubs followed (PDEATHSIG)
        assert list(srv.workspace_root().glob(f"ws-{pid}-*"))  # left behind by the killed process
        removed = srv.clean_stale()  # what every start does first
        assert any(f"ws-{pid}-" in r for r in removed)
    finally:
        server.stop(signal.SIGKILL)
    assert not server.leaks()
