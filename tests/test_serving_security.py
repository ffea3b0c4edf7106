"""The embedding endpoint against a hostile client and a hostile local user (issue 15), each attack
reproduced as it was made on the unhardened server:

- code execution: the model-repository API (a `load` with a `file:` override runs the caller's
  Python) is off, no process of the server holds a control key in its arguments or environment,
  and the workspace is a private per-user directory (one owned by another user, or open to
  others, is refused);
- truthful health: a killed backend stub (every request fails while Triton says ready) or a
  killed tritonserver makes the server exit with status 1, its whole process tree gone;
- memory: byolkit's front refuses oversize requests before holding them (HTTP 413 on the
  Content-Length, a chunked or compressed body counted as it is read; gRPC RESOURCE_EXHAUSTED), and
  the server's memory stays within 100 MiB after 10 of them; the pixel limit read from an image's
  header decides, not Pillow's own bomb limit;
- the HTTP endpoint: invalid JSON and a JSON uint8 of 300 are 400s, a half-sent body is closed after
  the read timeout;
- clients: deadlines and retries against a port with nothing behind it, a socket that hangs up
  and one that never answers; the command line's exit codes.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serving_util import ServerProcess, alive, children, encode, exported_model, picture, png_header, tree_pss_mib

from serving import server as srv
from serving.client import EmbeddingClient, ServerUnavailableError
from serving.client import _main as client_main

IMAGE_MODEL = "byol_encoder_image"
MAX_IMAGE_BYTES = 1_000_000
PROBE_INTERVAL = 1


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return exported_model(tmp_path_factory)


def _started(server: ServerProcess) -> ServerProcess:
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    s = _started(ServerProcess(onnx_model, tmp_path_factory.mktemp("secure"), "--max-image-bytes", MAX_IMAGE_BYTES,
                               "--probe-interval", PROBE_INTERVAL, "--exit-timeout", 5, "--read-timeout", 1))
    yield s
    code = s.stop()
    leaks = s.leaks()
    assert code == 0 and not leaks, f"exit {code}, left behind: {leaks}\n{s.stderr()[-2000:]}"


def _post(server, path: str, body: bytes, headers=None, timeout: float = 30) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def _proc_text(pid: int, name: str) -> str:
    return (Path(f"/proc/{pid}") / name).read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")


# -- code execution -----------------------------------------------------------------------------------
def test_no_control_key_anywhere_and_the_repository_api_cannot_load_code(server, tmp_path):
    tree = [server.proc.pid, *children(server.proc.pid)]
    assert len(tree) >= 4  # this process, tritonserver, two backend stubs
    triton = [p for p in tree if _proc_text(p, "cmdline").split()[0].endswith("/tritonserver")]
    assert len(triton) == 1 and "--model-control-mode=none" in _proc_text(triton[0], "cmdline")
    for pid in tree:  # what the attack read: a key for the repository API, in arguments or environment
        text = _proc_text(pid, "cmdline") + _proc_text(pid, "environ")
        for secret in ("restricted-api", "restricted-protocol", "byolkit-control", "model-control-mode=explicit"):
            assert secret not in text, (pid, secret)

    # the attack itself: load a model whose model.py is the caller's code
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    config = json.dumps({"backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]})
    body = json.dumps({"parameters": {"config": config,
                                      "file:1/model.py": base64.b64encode(code.encode()).decode()}}).encode()
    status, answer = _post(server, "/v2/repository/models/evil/load", body)
    assert status != 200 and "not allowed" in answer
    status, answer = _post(server, "/v2/repository/models/byol_encoder/unload", b"{}")
    assert status != 200 and "not allowed" in answer
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException, match="not allowed"):
        tc.InferenceServerClient(server.grpc_url.split("://")[1]).load_model(
            "evil", config=config, files={"file:1/model.py": code.encode()})
    time.sleep(0.5)
    assert not marker.exists()
    ready = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    ready.request("GET", "/v2/models/byol_encoder/ready")
    assert ready.getresponse().status == 200  # and the served model is still there


def test_the_workspace_and_the_shared_memory_are_private(server):
    root = srv.workspace_root()
    st = root.lstat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700
    (ws,) = root.glob(f"ws-{server.proc.pid}-*")
    assert ws.stat().st_mode & 0o777 == 0o700
    segments = list(Path("/dev/shm").glob(f"byolkit_{server.proc.pid}_*"))
    assert segments and all(s.stat().st_mode & 0o777 == 0o600 for s in segments)


def test_a_runtime_directory_of_another_user_or_open_to_others_is_refused(onnx_model, tmp_path, monkeypatch,
                                                                          capsys):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)  # nobody's, pre-created as the attacker would
    else:
        foreign = Path("/usr")  # root's: a directory this user does not own
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    cases = {open_to_all: "has mode 777: other users may use it", foreign: "belongs to uid",
             link: "is not a directory (a link?)"}
    for root, message in cases.items():
        monkeypatch.setenv(srv.RUNTIME_DIR_ENV, str(root))
        code = srv.main(["--model", str(onnx_model), "--http-port", str(srv.free_port()),
                         "--grpc-port", str(srv.free_port()), "--metrics-port", str(srv.free_port())])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: the runtime directory") and message in err, (root, err)
        assert not list(private.iterdir())  # nothing was written through the link


# -- truthful health -----------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["backend stub", "tritonserver"])
def test_a_killed_server_process_takes_the_server_down(onnx_model, tmp_path, victim):
    """Before: with a stub killed every request failed while /v2/health/ready said 200; with tritonserver
    killed, the server never exited, ignored SIGTERM and left two orphaned stubs."""
    server = _started(ServerProcess(onnx_model, tmp_path, "--probe-interval", PROBE_INTERVAL))
    try:
        tree = server.tree
        names = {p: _proc_text(p, "cmdline") for p in tree}
        stubs = [p for p in tree if "triton_python_backend_stub" in names[p]]
        triton = [p for p in tree if names[p].split()[0].endswith("/tritonserver")]
        assert len(stubs) == 2 and len(triton) == 1
        os.kill(stubs[0] if victim == "backend stub" else triton[0], signal.SIGKILL)
        assert server.proc.wait(30) == 1
        err = server.stderr()
        assert ("readiness probe failed" in err and "is not healthy" in err) if victim == "backend stub" \
            else "tritonserver exited unexpectedly with status -9" in err
        assert "Traceback" not in err
    finally:
        server.stop(signal.SIGKILL)
    assert not [p for p in tree if alive(p)]  # stubs included: no orphans
    assert not server.leaks()


# -- memory --------------------------------------------------------------------------------------------
def test_the_pixel_limit_is_read_from_the_header_and_is_the_servers_own(server):
    """Above 179 megapixels Pillow's own bomb check used to answer first (DecompressionBombError)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException
    client = tc.InferenceServerClient(server.grpc_url.split("://")[1])
    for w, h in ((9000, 8000), (20000, 20000)):
        inp = tc.InferInput("image_bytes", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([png_header(w, h)], dtype=np.object_).reshape(1, 1))
        with pytest.raises(InferenceServerException) as e:
            client.infer(IMAGE_MODEL, [inp])
        assert f"{w}x{h} pixels, above the limit of 64000000" in e.value.message()


# -- the front: limits before anything is held ---------------------------------------------------------
OVERSIZE = 64 * 2**20 + 1024  # above the default --max-request-bytes (64 MiB)


def _grpc_oversize(server):
    import grpc
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException
    inp = tc.InferInput("image_bytes", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([bytes(OVERSIZE)], dtype=np.object_).reshape(1, 1))
    with pytest.raises(InferenceServerException) as e:
        tc.InferenceServerClient(server.grpc_url.split("://")[1]).infer(IMAGE_MODEL, [inp])
    assert e.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED), e.value
    assert "larger than max" in e.value.message()


def test_tritonserver_listens_on_loopback_ports_behind_the_front(server):
    (triton,) = [p for p in server.tree if _proc_text(p, "cmdline").split()[0].endswith("/tritonserver")]
    args = _proc_text(triton, "cmdline")
    assert "--http-address=127.0.0.1" in args and "--grpc-address=127.0.0.1" in args
    assert f"--http-port={server.http_port} " not in args and f"--grpc-port={server.grpc_port} " not in args


def test_the_fronts_connections_are_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP: with proto 0 every HTTP answer's
    body (a second write after its headers) waited for the client's delayed ACK, about 40 ms a request."""
    import asyncio

    from serving.front import _listening_socket

    async def accepted_nodelay() -> int:
        sock = _listening_socket("127.0.0.1", 0)
        got = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        async with await asyncio.get_running_loop().create_server(Probe, sock=sock):
            with socket.create_connection(sock.getsockname()):
                return await asyncio.wait_for(got, 10)

    assert asyncio.run(accepted_nodelay()) == 1


def test_oversize_requests_are_refused_before_they_are_held_and_memory_stays(server):
    """Before: the bundled tritonserver read each 64 MiB request whole before the model refused it;
    10 of them took the server's processes from 415 to 736 MiB, kept for good."""
    good = np.zeros((1, 32, 32, 3), np.uint8)
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                                   "data": good.ravel().tolist()}]}).encode()
    assert _post(server, "/v2/models/byol_encoder/infer", body)[0] == 200  # warm: lazy allocations done
    before = tree_pss_mib(server.proc.pid)
    payload = bytes(OVERSIZE)
    for i in range(10):
        if i % 2:
            _grpc_oversize(server)
        else:
            status, answer = _post(server, "/v2/models/byol_encoder/infer", payload)
            assert status == 413 and "above the limit of 67108864" in answer
    time.sleep(1)
    after = tree_pss_mib(server.proc.pid)
    assert after - before < 100, f"{before:.0f} -> {after:.0f} MiB"
    assert _post(server, "/v2/models/byol_encoder/infer", body)[0] == 200


def test_a_chunked_body_is_counted_as_it_is_read(server):
    def chunks():
        for _ in range(80):
            yield bytes(2**20)

    c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        c.request("POST", "/v2/models/byol_encoder/infer", body=chunks(), encode_chunked=True)
        r = c.getresponse()
        assert r.status == 413 and b"above the limit of 67108864" in r.read()
    finally:
        c.close()


def test_a_compressed_body_is_inflated_within_the_limit(server):
    import gzip
    status, answer = _post(server, "/v2/models/byol_encoder/infer", gzip.compress(bytes(OVERSIZE)),
                           {"Content-Encoding": "gzip"})  # 65 KB that inflate to 64 MiB: a bomb
    assert status == 413 and "once decompressed" in answer
    status, answer = _post(server, "/v2/models/byol_encoder/infer", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in answer


def test_invalid_json_and_out_of_range_json_data_are_400(server):
    """Before: invalid JSON got Triton's 500, and a JSON uint8 of 300 was wrapped to 44 and answered 200."""
    status, answer = _post(server, "/v2/models/byol_encoder/infer", b"{not json")
    assert status == 400 and "invalid JSON" in answer and "Traceback" not in answer
    for value, datatype in ((300, "UINT8"), (-1, "UINT8"), (128, "INT8"), (2**64, "UINT64")):
        body = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": datatype,
                                       "data": [value] * (32 * 32 * 3)}]}).encode()
        status, answer = _post(server, "/v2/models/byol_encoder/infer", body)
        assert status == 400 and f"{datatype} data outside" in answer, (value, datatype, status, answer)
    # the JSON header of a binary-data request is checked too
    header = b'{"inputs": [{"name": "images"'
    status, answer = _post(server, "/v2/models/byol_encoder/infer", header + bytes(3072),
                           {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "invalid JSON" in answer
    pixels = np.full((1, 32, 32, 3), 255, np.uint8)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": "UINT8",
                                   "data": pixels.ravel().tolist()}]}).encode()
    status, answer = _post(server, "/v2/models/byol_encoder/infer", body)
    assert status == 200 and len(json.loads(answer)["outputs"][0]["data"]) == 512


def test_a_half_sent_body_is_closed_after_the_read_timeout(server):
    """Before: tritonserver held a half-sent body open with no read timeout."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as s:
        s.sendall(b"POST /v2/models/byol_encoder/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        answer = b""
        while chunk := s.recv(4096):  # until the server closes the connection (a hang fails on the timeout)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1 s" in answer


def test_an_oversize_grpc_message_is_refused_and_the_stream_is_forwarded(server):
    import queue

    import tritonclient.grpc as tc
    _grpc_oversize(server)
    client = tc.InferenceServerClient(server.grpc_url.split("://")[1])
    inp = tc.InferInput("images", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("byol_encoder", [inp])
        client.async_stream_infer("nope", [inp])
        results = [answers.get(timeout=60) for _ in range(2)]
    finally:
        client.stop_stream()
    assert results[0][1] is None and results[0][0].as_numpy("embeddings").shape == (1, 512)
    assert results[1][0] is None and "unknown model" in str(results[1][1])
    assert client.infer("byol_encoder", [inp]).as_numpy("embeddings").shape == (1, 512)


def test_the_client_keeps_each_request_under_the_servers_size_limit(onnx_model, monkeypatch):
    """The server refuses requests above --max-request-bytes: the client splits a batch of large images
    by bytes as well as by count (an image above the budget goes alone)."""
    from serving import client as client_module
    monkeypatch.setattr(client_module, "REQUEST_BYTES", 1000)
    client = EmbeddingClient(onnx_model, device="cpu")
    sent = []
    monkeypatch.setattr(client, "_batch", lambda items, normalize, image: sent.append(len(items))
                        or np.zeros((len(items), client.embedding_dim), np.float32))
    items = [(i, bytes(n)) for i, n in enumerate([400, 400, 400, 2000, 100, 100])]
    client._run(items, np.zeros((6, client.embedding_dim), np.float32), 32, True, image=True)
    assert sent == [2, 1, 1, 2]
    client._run(items[:5], np.zeros((6, client.embedding_dim), np.float32), 2, True, image=True)
    assert sent[4:] == [2, 1, 1, 1]


# -- clients -------------------------------------------------------------------------------------------
class _Listener:
    """A local TCP port that accepts connections and then hangs up at once, or holds them unanswered."""

    def __init__(self, mode: str):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.mode, self.accepted, self.held = self.sock.getsockname()[1], mode, 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "hang up":
                conn.close()
            else:
                self.held.append(conn)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("where", ["nothing listening", "hang up", "never answers"])
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_the_client_gives_up_in_bounded_time_and_says_the_server_is_unavailable(where, scheme, tmp_path, capsys):
    """Before: EmbeddingClient("grpc://...", timeout=5) blocked over 53 s on a server that did not answer,
    and an HTTP connection closed mid-request was not retried (the command line said: bad input)."""
    listener = None if where == "nothing listening" else _Listener(where)
    port = srv.free_port() if listener is None else listener.port
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="after 2 attempts"):
            EmbeddingClient(url, timeout=1, retries=1, backoff=0.01)
        assert time.monotonic() - start < 20  # a deadline on every step, not a hang
        if listener is not None:
            assert listener.accepted >= 1  # it did connect (the retries: "after 2 attempts")
        image = tmp_path / "a.png"
        image.write_bytes(encode(picture(0)))
        assert client_main([url, str(image), "--timeout", "1", "--retries", "1"]) == 1  # unavailable: 1, not 2
        assert capsys.readouterr().err.startswith(f"error: cannot reach {url}")
    finally:
        if listener is not None:
            listener.close()


def test_the_client_command_line_says_2_for_bad_input(onnx_model, tmp_path, capsys):
    assert client_main([str(onnx_model), str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    assert client_main([str(text), str(tmp_path / "missing.png")]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err
