"""The embedding endpoint: an exported encoder behind Triton's HTTP and gRPC protocol (KServe v2).

    python -m serving.server --model model.onnx|REPO [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]

Runs the tritonserver binary bundled with nvidia-pytriton on a model repository written into a
private workspace (see serving/repository.py): the exported model under its own name and tensor
names, plus `<name>_image` for encoded image bytes, both on the python backend running ONNX
Runtime (serving/triton_model.py), with Triton's dynamic batcher, health, metadata and metrics.

What the bundled binary needs, set up here: the system libpython of this interpreter and the
wheel's own libraries on LD_LIBRARY_PATH, this interpreter's bin directory first on PATH (the
backend stub embeds Python and finds this environment's site-packages through it), this
checkout in BYOLKIT_ROOT (the stub runs Python isolated, ignoring PYTHONPATH; the model adds it
to sys.path to import serving.engine and trainer.preprocess from the same code), the wheel's
backend stub for this Python version in the backend directory, and SIGINT/SIGTERM at their
defaults in the child even when this process was started with them ignored.

Shutdown: SIGINT or SIGTERM to this process unloads the models (in-flight requests finish, the
backend stubs exit and free their shared memory) and then stops tritonserver (a second signal
kills it); any shared-memory segment still under this server's own prefix is removed and the
workspace deleted. The models are loaded in explicit model-control mode so that this process can
unload them; the model-repository API is restricted to a random per-server key. Workspaces and segments of servers whose process died
without cleaning up (SIGKILL) are removed at the next start.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .engine import MAX_IMAGE_BYTES, ModelError, onnx_providers
from .repository import ServingSettings, describe, load_model, write_repository

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_ROOT = Path(tempfile.gettempdir()) / "byolkit-serving"
SHM_DIR = Path("/dev/shm")
_counter = itertools.count()


# What tritonserver logs on a machine without a GPU, as errors, while working fine.
CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM unable to start")


# The model-repository API (load, unload, index) needs this header with a per-server random key.
CONTROL_HEADER = "byolkit-control"
# After the models are unloaded, how long tritonserver may take to exit before it is killed.
IDLE_CONNECTION_GRACE_S = 3


class ServerError(RuntimeError):
    """The server could not be started, or stopped working."""


class UsageError(ValueError):
    """Bad settings, found before anything starts."""


# -- what the bundled tritonserver needs --------------------------------------------------------
def bundled_tritonserver() -> dict:
    """Paths inside the nvidia-pytriton wheel: binary, its libraries, python backend, stub."""
    try:
        import pytriton
    except ImportError:
        raise ServerError("nvidia-pytriton is not installed (pip install nvidia-pytriton)") from None
    root = Path(pytriton.__file__).resolve().parent
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    paths = {"binary": root / "tritonserver" / "bin" / "tritonserver",
             "libs": root.parent / "nvidia_pytriton.libs",
             "backend": root / "tritonserver" / "backends" / "python",
             "stub": root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise ServerError(f"the nvidia-pytriton wheel lacks {', '.join(missing)} (no stub for Python {version}?)")
    return paths


def server_env(paths: dict) -> dict:
    env = dict(os.environ)

    def prepend(key, *values):
        env[key] = os.pathsep.join([*values, *([env[key]] if env.get(key) else [])])

    libdir = sysconfig.get_config_var("LIBDIR")
    prepend("LD_LIBRARY_PATH", *([libdir] if libdir else []), str(paths["libs"]))
    prepend("PATH", str(Path(sys.executable).parent))
    env["BYOLKIT_ROOT"] = str(PACKAGE_ROOT)  # the stub ignores PYTHONPATH; triton_model.py reads this
    return env


def write_backends(root: Path, paths: dict) -> Path:
    """backends/python: the wheel's python backend plus the stub for this Python, as links."""
    python = root / "python"
    python.mkdir(parents=True)
    for src in [*paths["backend"].iterdir(), paths["stub"]]:
        if src.is_file():
            (python / src.name).symlink_to(src)
    return root


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _child_setup():  # runs in the child between fork and exec: no imports, no locks
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # ignored signals survive exec; these must work
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: tritonserver goes when its parent goes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_segments(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(prefix + "*")) if SHM_DIR.is_dir() else []


def clean_stale() -> list[str]:
    """Remove the workspaces and shared-memory segments of servers whose process is gone."""
    removed = []
    if WORKSPACE_ROOT.is_dir():
        for ws in WORKSPACE_ROOT.glob("ws-*"):
            pid = ws.name.split("-")[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(ws, ignore_errors=True)
                removed.append(str(ws))
    for seg in shm_segments("byolkit_"):
        pid = seg.name.split("_")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                seg.unlink()
                removed.append(str(seg))
    return removed


def check_port_free(host: str, port: int, flag: str):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UsageError(f"{flag} {port}: port {port} on {host} {why}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the server ----------------------------------------------------------------------------------
class EmbeddingServer:
    """tritonserver serving one exported encoder; a context manager that always cleans up.

        with EmbeddingServer("model.onnx", http_port=8000, grpc_port=8001, metrics_port=8002) as server:
            ...  # server.http_url, server.grpc_url, server.metrics_url

    Start it from a thread that outlives it: the child is bound to that thread (PR_SET_PDEATHSIG).
    """

    def __init__(self, model, *, model_name: str | None = None, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, settings: ServingSettings | None = None,
                 exit_timeout: int = 30, verbose: bool = False, log=None):
        self.settings = settings or ServingSettings()
        s = self.settings
        for flag, value, low in (("max batch size", s.max_batch_size or 1, 1), ("instances", s.instances, 1),
                                 ("max queue delay", s.max_queue_delay_us or 0, 0), ("threads", s.threads, 0),
                                 ("max pixels", s.max_pixels, 1), ("max image bytes", s.max_image_bytes, 1),
                                 ("exit timeout", exit_timeout, 1)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}, got {value}")
        try:
            onnx_providers(s.device)
        except ModelError as e:
            raise UsageError(str(e)) from None
        ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        if len(set(ports.values())) != 3:
            raise UsageError(f"the HTTP, gRPC and metrics ports must differ, got {sorted(ports.values())}")
        for flag, port in ports.items():
            if not 0 < port < 65536:
                raise UsageError(f"{flag} {port}: not a port number")
        self.model = load_model(model, model_name)  # ModelError for anything that is not an encoder
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.exit_timeout, self.verbose = exit_timeout, verbose
        self.log = log if log is not None else sys.stderr
        self.model_names: list[str] = []
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.shm_prefix = f"byolkit_{os.getpid()}_{next(_counter)}_"
        self.leftover_segments: list[str] = []  # segments that a clean shutdown should have removed
        self.killed_after_unload = False  # tritonserver still waited for idle HTTP connections
        self.returncode: int | None = None
        self.process_returncode: int | None = None
        self._tail = collections.deque(maxlen=60)
        self._reader: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._quiet_gpu = False
        self._ready_once = False
        self._control_key = secrets.token_hex(16)  # guards load/unload: only this process may call them

    # -- addresses ---------------------------------------------------------------------------
    def _url(self, scheme, port):
        host = f"[{self.host}]" if ":" in self.host else self.host
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "[::]" else host
        return f"{scheme}://{host}:{port}"

    @property
    def http_url(self) -> str:
        return self._url("http", self.http_port)

    @property
    def grpc_url(self) -> str:
        return self._url("grpc", self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return self._url("http", self.metrics_port) + "/metrics"

    # -- life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 300) -> EmbeddingServer:
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            check_port_free(self.host, port, flag)
        paths = bundled_tritonserver()
        clean_stale()
        WORKSPACE_ROOT.mkdir(parents=True, exist_ok=True)
        self.workspace = Path(tempfile.mkdtemp(prefix=f"ws-{os.getpid()}-", dir=WORKSPACE_ROOT))
        try:
            self.model_names = write_repository(self.model, self.settings, self.workspace / "models")
            write_backends(self.workspace / "backends", paths)
            self._spawn(paths)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, paths: dict) -> list[str]:
        gpu = self.settings.device != "cpu" and "CUDAExecutionProvider" in str(onnx_providers(self.settings.device))
        args = {"model-repository": self.workspace / "models", "backend-directory": self.workspace / "backends",
                "disable-auto-complete-config": None,
                "http-address": self.host, "http-port": self.http_port,
                "grpc-address": self.host, "grpc-port": self.grpc_port,
                "metrics-address": self.host, "metrics-port": self.metrics_port,
                "allow-gpu-metrics": str(gpu).lower(), "exit-timeout-secs": self.exit_timeout,
                "log-info": str(self.verbose).lower(), "model-control-mode": "explicit",
                "http-restricted-api": f"model-repository:{CONTROL_HEADER}={self._control_key}",
                "grpc-restricted-protocol": f"model-repository:{CONTROL_HEADER}={self._control_key}"}
        if not gpu:
            args["pinned-memory-pool-byte-size"] = 0
        self._quiet_gpu = not gpu
        cmd = [str(paths["binary"])] + [f"--{k}" if v is None else f"--{k}={v}" for k, v in args.items()]
        cmd += [f"--load-model={name}" for name in self.model_names]
        cmd += [f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--backend-config=python,shm-default-byte-size=4194304",
                "--backend-config=python,shm-growth-byte-size=8388608"]
        return cmd

    def _spawn(self, paths: dict):
        self.process = subprocess.Popen(self._command(paths), env=server_env(paths), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_child_setup, cwd=self.workspace)  # noqa: PLW1509 - see _child_setup
        self._reader = threading.Thread(target=self._pump, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _pump(self):
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self._tail.append(line)
            if self.log and not (self._quiet_gpu and any(n in line for n in CPU_ONLY_NOISE)):
                with contextlib.suppress(ValueError, OSError):
                    self.log.write(line)
                    self.log.flush()

    def log_tail(self, lines: int = 20) -> str:
        return "".join(list(self._tail)[-lines:])

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._stop_requested.is_set():
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                  + self.log_tail())
            if self.ready() and all(self._get(f"/v2/models/{n}/ready") == 200 for n in self.model_names):
                self._ready_once = True
                return
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n" + self.log_tail())
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request_stop(self):
        """Safe from a signal handler: makes start() give up waiting and serve_forever() return."""
        self._stop_requested.set()

    def serve_forever(self) -> int:
        """Block until request_stop() or until tritonserver dies; then stop -> exit status."""
        while self.alive() and not self._stop_requested.wait(0.5):
            pass
        died = not self.alive() and not self._stop_requested.is_set()
        code = self.stop()
        if died:
            raise ServerError(f"tritonserver exited unexpectedly with status {code}:\n" + self.log_tail())
        return code

    def kill(self):
        if self.alive():
            self.process.kill()

    def _control(self, path: str, timeout: float = 10):
        """The model-repository API, restricted to this process by its key -> decoded JSON."""
        req = urllib.request.Request(self.http_url + path, data=b"{}", method="POST",
                                     headers={CONTROL_HEADER: self._control_key})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def _unload_models(self, timeout: float) -> bool:
        """Unload every model: new requests are refused, in-flight ones finish, the backend stubs exit
        and free their shared memory. -> whether all were unloaded within `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            for name in self.model_names:
                self._control(f"/v2/repository/models/{name}/unload")
            while time.monotonic() < deadline:
                states = {m["name"]: m.get("state") for m in self._control("/v2/repository/index")}
                if all(states.get(n) in (None, "UNAVAILABLE") for n in self.model_names):
                    return True
                time.sleep(0.1)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        return False

    def stop(self) -> int | None:
        """Stop serving and clean up; idempotent -> 0 for a clean stop, else tritonserver's exit status.

        First the models are unloaded through the model-repository API (in-flight requests finish,
        the stubs exit cleanly), then tritonserver gets SIGINT. Triton's own shutdown waits for
        every open HTTP connection, idle keep-alive ones too, up to the exit timeout, and leaves the
        models no time to unload when a client keeps one open; with the models already unloaded
        there is nothing left to wait for, so after a short grace it is killed.
        """
        self._stop_requested.set()
        if self.process is not None:
            unloaded = False
            if self.process.poll() is None:
                unloaded = self._ready_once and self._unload_models(self.exit_timeout)
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(IDLE_CONNECTION_GRACE_S if unloaded else self.exit_timeout + 15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    self.killed_after_unload = unloaded
            if self._reader is not None:
                self._reader.join(timeout=5)
            self.process.stdout.close()
            code = self.process_returncode = self.process.returncode
            self.returncode = 0 if unloaded and code in (0, -signal.SIGKILL) else code
            self.process = None
        # a clean shutdown leaves nothing here; whatever is left (a crash) is removed
        left = shm_segments(self.shm_prefix)
        self.leftover_segments += [p.name for p in left]
        for seg in left:
            with contextlib.suppress(OSError):
                seg.unlink()
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None
        return self.returncode

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


# -- command line ----------------------------------------------------------------------------------
def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a message that says which bound failed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" if minimum
                                             else f"must be 0 or more, got {value}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


EPILOG = """\
Models served (names as in the repository that export.triton writes):
  NAME          the exported model itself: `images` uint8 [N, H, W, 3] (or `pixel_values`
                float32 [N, 3, H, W] for a float export) -> `embeddings` float32 [N, D]
  NAME_image    `image_bytes` BYTES [N, 1]: encoded JPEG/PNG/WebP/... images, decoded,
                EXIF-rotated, converted to RGB and resized on the server by the model's
                preprocessing contract -> `embeddings` float32 [N, D]
Embeddings are L2-normalised; send the request parameter raw=true for the encoder's raw output.
NAME is byol_encoder unless --model-name says otherwise.

Endpoints (Triton / KServe v2): HTTP /v2/health/ready, /v2/models/NAME (metadata),
/v2/models/NAME/config, /v2/models/NAME/infer; gRPC GRPCInferenceService; Prometheus metrics
on --metrics-port at /metrics (Triton's, plus byolkit_refused_requests_total: Triton counts a
refused request as a success). The model-repository API (load, unload, index) is reserved to
this process. Once ready, one JSON line with the URLs goes to stdout.

A repository's instance groups and TensorRT settings are Triton's onnxruntime backend's; here
--instances and --device decide (the nvidia-pytriton wheel has no onnxruntime backend: the
models run on its python backend, which runs ONNX Runtime).

SIGINT (Ctrl-C) or SIGTERM stops the server after its in-flight requests (a second one, a second
or more later, kills it). Exit status: 0 stopped cleanly, 1 the server failed, 2 bad input.

Examples:
  python -m serving.server --model runs/c10/model.onnx
  python -m serving.server --model triton_repo --host 0.0.0.0 --instances 2 --max-queue-delay-us 5000
  python -c "from serving.client import EmbeddingClient; print(EmbeddingClient('grpc://127.0.0.1:8001').embed(['a.jpg']).shape)"
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.server", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Serve an exported byolkit encoder over HTTP and gRPC with the Triton Inference Server "
                    "bundled with nvidia-pytriton (KServe v2 protocol), ONNX Runtime inside.")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="the exported encoder: an ONNX file (python -m export.onnx) or a Triton model repository "
                        "(export.triton); a repository's latest version is served")
    p.add_argument("--model-name", metavar="NAME",
                   help="name to serve an ONNX file under (default byol_encoder); for a repository holding several "
                        "models, which one to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=_port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--max-batch-size", type=_positive, metavar="N",
                   help="largest batch, per request and per dynamic batch (default: the repository's, "
                        "64 for an ONNX file); bigger requests are refused")
    p.add_argument("--max-queue-delay-us", type=_non_negative, default=None, metavar="US",
                   help="how long the dynamic batcher may hold a request to fill a batch, in microseconds "
                        "(default: the repository's, 2000 for an ONNX file); a repository's preferred batch "
                        "sizes and warm-up are kept too")
    p.add_argument("--no-dynamic-batching", action="store_true",
                   help="run each request on its own (for comparison; dynamic batching is on by default)")
    p.add_argument("--instances", type=_positive, default=1, metavar="N",
                   help="model instances per model (processes, each with its own ONNX Runtime session; default 1)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when onnxruntime-gpu sees a GPU, else CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=_non_negative, default=0, metavar="N",
                   help="ONNX Runtime intra-op threads per instance (default 0: ONNX Runtime's choice)")
    p.add_argument("--max-pixels", type=_positive, default=ServingSettings.max_pixels, metavar="N",
                   help="refuse encoded images with more pixels (decompression bombs; default %(default)s)")
    p.add_argument("--max-image-bytes", type=_positive, default=MAX_IMAGE_BYTES, metavar="N",
                   help="refuse encoded images larger than this (default %(default)s)")
    p.add_argument("--no-image-model", action="store_true", help="serve only the tensor model, not NAME_image")
    p.add_argument("--exit-timeout", type=_positive, default=30, metavar="S",
                   help="on SIGINT/SIGTERM, how long in-flight requests may take to finish (default 30 s)")
    p.add_argument("--verbose", action="store_true", help="tritonserver's info log too (warnings and errors always)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    stop = threading.Event()
    holder: list[EmbeddingServer] = []
    first: list[float] = []

    def on_signal(signum, frame):
        # a second signal kills; one within a second of the first is the same request delivered twice
        # (e.g. to this process and to its process group)
        if first and time.monotonic() - first[0] > 1 and holder:
            holder[0].kill()
        first.append(time.monotonic())
        stop.set()
        if holder:
            holder[0].request_stop()

    # installed before anything starts, whatever the parent left (SIG_IGN from `cmd &` in a script),
    # and restored on the way out (main may run inside another program, e.g. a test session)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args, stop, holder)
    finally:
        if holder:
            holder[0].stop()  # idempotent: whatever happened, nothing is left running
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args, stop: threading.Event, holder: list) -> int:
    settings = ServingSettings(max_batch_size=args.max_batch_size, dynamic_batching=not args.no_dynamic_batching,
                               max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                               device=args.device, threads=args.threads, max_pixels=args.max_pixels,
                               max_image_bytes=args.max_image_bytes, image_model=not args.no_image_model)
    try:
        server = EmbeddingServer(args.model, model_name=args.model_name, host=args.host, http_port=args.http_port,
                                 grpc_port=args.grpc_port, metrics_port=args.metrics_port, settings=settings,
                                 exit_timeout=args.exit_timeout, verbose=args.verbose)
        holder.append(server)
        if stop.is_set():
            return 0
        server.start()
    except (UsageError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if stop.is_set():  # a signal arrived while starting
        server.stop()
        return 0
    print(f"serving {', '.join(server.model_names)}: {describe(server.model)}\n"
          f"  HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    print(json.dumps({"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                      "models": server.model_names}), flush=True)
    try:
        code = server.serve_forever()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if server.leftover_segments:
        print(f"warning: removed shared memory left behind: {', '.join(server.leftover_segments)}", file=sys.stderr)
    how = ("models unloaded; tritonserver, waiting for idle HTTP connections, stopped with SIGKILL"
           if server.killed_after_unload else f"tritonserver exit status {server.process_returncode}")
    print(f"stopped ({how})", file=sys.stderr)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
