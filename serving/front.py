"""byolkit's own front for the embedding endpoint: the public HTTP and gRPC ports, tritonserver behind.

The tritonserver bundled with nvidia-pytriton has no request-size limit on either protocol: it
reads a whole request into memory before anything can refuse it, and keeps much of that memory
(issue 15). This front, in the server's own process, listens on the public ports and hands each
request on to tritonserver on internal loopback ports, after:

HTTP (uvicorn, one event loop; httpx to tritonserver)
  - a body limit checked before the body is held: a Content-Length above --max-request-bytes is
    answered 413 at once (the body is read and thrown away as it arrives, so that the client,
    which sends all of it before it reads, sees the answer); a chunked body is counted as it is
    read and refused when it goes over; a compressed body (Content-Encoding gzip/deflate) is
    inflated here, bounded by the same limit, and sent on plain;
  - a read timeout: a body that stops arriving for --read-timeout seconds gets 408 and the
    connection is closed;
  - the JSON of every POST parsed here: invalid JSON is a 400 (Triton answers 500), and an
    integer tensor's JSON `data` outside its datatype's range (a UINT8 of 300) a 400 (Triton
    wraps it to 44); the bytes that go on are the client's own;
  - tritonserver's answers unchanged (its 503 "Exceeds maximum queue size" is the busy answer);
    502 when it cannot be reached, 504 when it does not answer within --request-timeout.

gRPC (grpcio's aio server, generic handlers: raw bytes, no protobuf parsing)
  - grpc.max_receive_message_length = --max-request-bytes: a larger message is refused by gRPC
    itself with RESOURCE_EXHAUSTED;
  - every unary method and the ModelStreamInfer stream forwarded as bytes with the caller's
    metadata; a unary call's deadline is the caller's, at most --request-timeout; tritonserver's
    status codes and messages are passed back.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import zlib

import numpy as np

MAX_REQUEST_BYTES = 64 * 1024 * 1024
READ_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 120.0
SERVICE = "/inference.GRPCInferenceService/"
STREAM_METHOD = SERVICE + "ModelStreamInfer"

# the range of each integer datatype of the KServe v2 protocol (JSON `data` is checked against it)
INT_RANGES = {f"{k}{b}": ((0, 2 ** b - 1) if k == "UINT" else (-(2 ** (b - 1)), 2 ** (b - 1) - 1))
              for k in ("UINT", "INT") for b in (8, 16, 32, 64)}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "host", "content-length"}
_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


class RequestRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- HTTP ---------------------------------------------------------------------------------------------
def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body -> its bytes, never more than `limit` of them (a compression bomb is a 413)."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestRefused(400, f"request body is not valid {encoding} data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise RequestRefused(413, f"request body above the limit of {limit} bytes once decompressed")
    return out


def _out_of_range(data, lo: int, hi: int) -> bool:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):  # ragged: Triton answers it
        return False
    if arr.dtype.kind in "iuf":
        return bool(arr.size) and (arr.min() < lo or arr.max() > hi)
    if arr.dtype.kind == "O":  # integers beyond int64
        flat = arr.ravel().tolist()
        return any(isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi for v in flat)
    return False


def check_json(body: bytes, header_length: str | None, infer: bool) -> None:
    """Raise RequestRefused(400) for a JSON part that does not parse, or an infer request whose integer
    tensor's JSON data lies outside its datatype's range."""
    part = body
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise RequestRefused(400, f"Inference-Header-Content-Length {header_length!r} does not fit the body "
                                      f"of {len(body)} bytes")
        part = body[:n]
    if not part.strip():
        return
    try:
        doc = json.loads(part)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestRefused(400, f"invalid JSON in the request body: {e}") from None
    if not infer or not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        return
    for inp in doc["inputs"]:
        if isinstance(inp, dict) and inp.get("datatype") in INT_RANGES and "data" in inp:
            lo, hi = INT_RANGES[inp["datatype"]]
            if _out_of_range(inp["data"], lo, hi):
                raise RequestRefused(400, f"input {inp.get('name')!r}: {inp['datatype']} data outside "
                                          f"{lo}..{hi}")


class HttpFront:
    """The ASGI application: limits and checks, then the request on to tritonserver's HTTP port."""

    def __init__(self, upstream: str, max_request_bytes: int, read_timeout: float, request_timeout: float):
        self.upstream, self.limit = upstream, max_request_bytes
        self.read_timeout, self.request_timeout = read_timeout, request_timeout
        self.client = None  # httpx.AsyncClient, made on the front's event loop

    async def _answer(self, send, status: int, message: str, close: bool = False):
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, receive, headers: dict) -> bytes | None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise RequestRefused(413, f"request body of {length} bytes, above the limit of {self.limit}")
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise RequestRefused(408, f"request body not received within {self.read_timeout:g} s") from None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise RequestRefused(413, f"request body above the limit of {self.limit} bytes")
            if not message.get("more_body", False):
                return bytes(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await self._read_body(receive, headers)
            if body is None:
                return
            encoding = headers.get("content-encoding", "").strip().lower()
            # inflating and parsing are CPU work: off the event loop, so other requests keep moving
            if encoding in ("gzip", "deflate"):
                body = await asyncio.to_thread(_inflate, body, encoding, self.limit)
                headers.pop("content-encoding")
            if scope["method"] == "POST":
                await asyncio.to_thread(check_json, body, headers.get("inference-header-content-length"),
                                        bool(_INFER.match(scope["path"])))
        except RequestRefused as e:
            # 408: the rest of the body may never come, so the connection goes; 413 and 400: it stays, and
            # what is left of the body is read and thrown away as it arrives (never held)
            await self._answer(send, e.status, str(e), close=e.status == 408)
            return
        await self._forward(scope, headers, body, send)

    async def _forward(self, scope, headers: dict, body: bytes, send):
        import httpx
        out = [(k, v) for k, v in headers.items() if k not in HOP_BY_HOP]
        if "accept-encoding" not in headers:
            out.append(("accept-encoding", "identity"))  # httpx would ask for gzip on the client's behalf
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            request = self.client.build_request(scope["method"], self.upstream + target, headers=out, content=body)
            response = await self.client.send(request, stream=True)
            try:
                data = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            await self._answer(send, 504, f"no answer from the model server within {self.request_timeout:g} s")
            return
        except httpx.HTTPError as e:
            await self._answer(send, 502, f"the model server cannot be reached ({type(e).__name__})")
            return
        reply = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
                 if k.lower() not in HOP_BY_HOP]
        reply.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": reply})
        await send({"type": "http.response.body", "body": data})


# -- gRPC ---------------------------------------------------------------------------------------------
def _grpc_handler(channel, request_timeout: float):
    import grpc

    def metadata(context):
        return tuple((k, v) for k, v in context.invocation_metadata()
                     if not k.startswith((":", "grpc-")) and k not in ("user-agent", "te", "content-type"))

    def timeout(context):
        left = context.time_remaining()
        return request_timeout if left is None else max(0.0, min(left, request_timeout))

    class Forward(grpc.GenericRpcHandler):
        def __init__(self):
            self.calls = {}

        def service(self, details):
            method = details.method
            if method == STREAM_METHOD:
                call = channel.stream_stream(method)

                async def stream(requests, context):
                    left = context.time_remaining()  # a stream lives as long as its caller wants
                    upstream = call(requests, timeout=left, metadata=metadata(context))
                    try:
                        async for response in upstream:
                            yield response
                    except grpc.aio.AioRpcError as e:
                        await context.abort(e.code(), e.details() or "")
                    finally:
                        upstream.cancel()
                return grpc.stream_stream_rpc_method_handler(stream)
            call = self.calls.get(method)
            if call is None:
                call = channel.unary_unary(method)
                if method.startswith(SERVICE):  # Triton's own methods only: callers choose the names
                    self.calls[method] = call

            async def unary(request, context):
                try:
                    return await call(request, timeout=timeout(context), metadata=metadata(context))
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), e.details() or "")
            return grpc.unary_unary_rpc_method_handler(unary)

    return Forward()


# -- both, on one event loop in a thread ------------------------------------------------------------
def _listening_socket(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it the
    # answer's body (a second write after its headers) waits for the client's delayed ACK, about 40 ms
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Front:
    """The public HTTP and gRPC ports, in a thread of this process, in front of tritonserver's internal ones.

        front = Front("127.0.0.1", 8000, 8001, "127.0.0.1", 18000, 18001).start()   # OSError if a port is taken
        ...
        front.stop()
    """

    def __init__(self, host: str, http_port: int, grpc_port: int, upstream_host: str, upstream_http_port: int,
                 upstream_grpc_port: int, *, max_request_bytes: int = MAX_REQUEST_BYTES,
                 read_timeout: float = READ_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S,
                 grace: float = 30.0):
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.upstream_http = f"http://{upstream_host}:{upstream_http_port}"
        self.upstream_grpc = f"{upstream_host}:{upstream_grpc_port}"
        self.max_request_bytes, self.read_timeout = max_request_bytes, read_timeout
        self.request_timeout, self.grace = request_timeout, grace
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._uvicorn = None

    def start(self) -> Front:
        self._sock = _listening_socket(self.host, self.http_port)  # OSError here, in the caller's thread
        self._thread = threading.Thread(target=self._run, name="byolkit-front", daemon=True)
        self._thread.start()
        self._started.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to the server, which stops
            self.error = e
        finally:
            self._started.set()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self):
        import grpc
        import httpx
        import uvicorn
        self._stopping = asyncio.Event()
        app = HttpFront(self.upstream_http, self.max_request_bytes, self.read_timeout, self.request_timeout)
        app.client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=10),
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        channel = grpc.aio.insecure_channel(self.upstream_grpc, options=unlimited)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_request_bytes),
                                          ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_grpc_handler(channel, self.request_timeout),))
        address = f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"
        try:
            if server.add_insecure_port(address) != self.grpc_port:
                raise OSError(f"cannot listen on {address}")
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        await server.start()
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=int(max(1, self.grace)), timeout_keep_alive=5)
        self._uvicorn = uvicorn.Server(config)
        http = asyncio.ensure_future(self._uvicorn.serve(sockets=[self._sock]))
        try:
            while not self._uvicorn.started and not http.done():
                await asyncio.sleep(0.01)
            if http.done():
                http.result()  # its error
                raise OSError("the HTTP front stopped while starting")
            self._started.set()
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([http, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._uvicorn.should_exit = True
            await asyncio.gather(http, return_exceptions=True)
            await server.stop(self.grace)
            await channel.close()
            await app.client.aclose()
            self._sock.close()
        if not self._stopping.is_set():
            raise RuntimeError("the HTTP front stopped on its own")

    def stop(self, timeout: float | None = None):
        """Finish the requests in flight (up to the grace period), close both ports; idempotent."""
        if self._thread is None or not self._thread.is_alive():
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout if timeout is not None else self.grace + 10)
