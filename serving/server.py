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
to sys.path to import serving.engine and contract.preprocess from the same code), the wheel's
backend stub for this Python version in the backend directory, and SIGINT/SIGTERM at their
defaults in the child even when this process was started with them ignored.

Shutdown: SIGINT or SIGTERM to this process passes SIGINT to tritonserver, which finishes the
in-flight requests, unloads the models (the backend stubs exit and free their shared memory) and
exits; a second signal kills it. Whatever is left of its process group (stubs of a tritonserver
that died or timed out) is killed, any shared-memory segment under this server's own prefix is
removed and the workspace deleted. Workspaces and segments of servers whose process died without
cleaning up (SIGKILL) are removed at the next start.

The public --http-port and --grpc-port are byolkit's front (serving/front.py), in this process:
request-size limits before a request is held, a read timeout, JSON checks; tritonserver listens
behind it on two loopback ports chosen at start, opened to the public only once ready.

Hardening (README, "Security"): models are loaded once at start (--model-control-mode=none): the
model-repository API that could load a model with code of the caller's choosing is off, so there
is no control key to steal. The workspace (the model code the stubs run) lives in a per-user
private runtime directory, created 0700 and refused when another user owns it or others may use
it. Readiness is checked for real: every --probe-interval seconds one inference runs through each
model's backend stub, and when one fails, or tritonserver dies, this process stops everything
(the whole process group, stubs included) and exits with status 1, so that a supervisor sees it.
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
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from contract.errors import UsageError

from .engine import MAX_IMAGE_BYTES, ModelError, onnx_providers
from .front import MAX_REQUEST_BYTES, READ_TIMEOUT_S, REQUEST_TIMEOUT_S, Front
from .repository import ServingSettings, describe, load_model, write_repository

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIR_ENV = "BYOLKIT_RUNTIME_DIR"  # where the private workspaces go (default: see workspace_root)
SHM_DIR = Path("/dev/shm")
_counter = itertools.count()


# What tritonserver logs on a machine without a GPU, as errors, while working fine.
CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM unable to start")


# How long a readiness probe may take, and how many timed-out probes in a row mean the server is stuck
# (an error answer from a model fails the server at once).
PROBE_TIMEOUT_S = 30
PROBE_TIMEOUTS_FATAL = 3


class ServerError(RuntimeError):
    """The server could not be started, or stopped working."""


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
    # glibc hands large buffers (a refused request's body) back to the system when they are freed,
    # instead of keeping them in the heap for good (unless the caller set its own malloc tuning)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    return env


def workspace_root() -> Path:
    """The per-user private directory for workspaces, created 0700; refused unless this user owns it
    and nobody else may use it (another user could otherwise swap the model code the stubs run).

    BYOLKIT_RUNTIME_DIR if set, else $XDG_RUNTIME_DIR/byolkit-serving, else <tmp>/byolkit-serving-<uid>.
    """
    uid = os.geteuid()
    if os.environ.get(RUNTIME_DIR_ENV):
        root = Path(os.environ[RUNTIME_DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(os.environ["XDG_RUNTIME_DIR"]) / "byolkit-serving"
    else:
        root = Path(tempfile.gettempdir()) / f"byolkit-serving-{uid}"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as e:
        raise ServerError(f"cannot create the runtime directory {root}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ServerError(f"the runtime directory {root} is not a directory (a link?): refusing it")
    if st.st_uid != uid:
        raise ServerError(f"the runtime directory {root} belongs to uid {st.st_uid}, not to this user (uid {uid}): "
                          f"refusing it (remove it, or set {RUNTIME_DIR_ENV} to a private directory)")
    if st.st_mode & 0o077:
        raise ServerError(f"the runtime directory {root} has mode {stat.S_IMODE(st.st_mode):o}: other users may use "
                          f"it; refusing it (chmod 700 it, or set {RUNTIME_DIR_ENV} to a private directory)")
    return root


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
    os.umask(0o077)  # whatever tritonserver and the stubs create: this user's alone
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
    root = workspace_root()
    if root.is_dir():
        for ws in root.glob("ws-*"):
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


def _probe_png() -> bytes:
    """A small grey PNG: what the readiness probe sends to the encoded-image model."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def check_port_free(host: str, port: int, flag: str):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UsageError(f"{flag} {port}: port {port} on {host} {why}") from None


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n different ports free on host now (held together while chosen, so never the same one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


# -- the server ----------------------------------------------------------------------------------
class EmbeddingServer:
    """tritonserver serving one exported encoder; a context manager that always cleans up.

        with EmbeddingServer("model.onnx", http_port=8000, grpc_port=8001, metrics_port=8002) as server:
            ...  # server.http_url, server.grpc_url, server.metrics_url

    Start it from a thread that outlives it: the child is bound to that thread (PR_SET_PDEATHSIG).
    """

    def __init__(self, model, *, model_name: str | None = None, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, settings: ServingSettings | None = None,
                 exit_timeout: int = 30, probe_interval: float = 5.0, max_request_bytes: int = MAX_REQUEST_BYTES,
                 read_timeout: float = READ_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S,
                 verbose: bool = False, log=None):
        self.settings = settings or ServingSettings()
        s = self.settings
        for flag, value, low in (("max batch size", s.max_batch_size or 1, 1), ("instances", s.instances, 1),
                                 ("max queue delay", s.max_queue_delay_us or 0, 0), ("threads", s.threads, 0),
                                 ("max pixels", s.max_pixels, 1), ("max image bytes", s.max_image_bytes, 1),
                                 ("max queue size", s.max_queue_size, 1), ("exit timeout", exit_timeout, 1),
                                 ("probe interval", probe_interval, 0), ("max request bytes", max_request_bytes, 1),
                                 ("read timeout", read_timeout, 0.001), ("request timeout", request_timeout, 0.001)):
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
        self.exit_timeout, self.probe_interval, self.verbose = exit_timeout, probe_interval, verbose
        self.max_request_bytes, self.read_timeout = max_request_bytes, read_timeout
        self.request_timeout = request_timeout
        self.front: Front | None = None  # the public HTTP and gRPC ports (serving/front.py)
        self.internal_http_port = self.internal_grpc_port = None  # tritonserver's, on 127.0.0.1
        self.log = log if log is not None else sys.stderr
        self.model_names: list[str] = []
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.shm_prefix = f"byolkit_{os.getpid()}_{next(_counter)}_"
        self.leftover_segments: list[str] = []  # segments that a clean shutdown should have removed
        self.killed_leftovers: list[int] = []  # processes of tritonserver's group still alive after it exited
        self.exit_timeout_expired = False  # tritonserver waited the whole exit timeout (open HTTP connections)
        self.returncode: int | None = None
        self.process_returncode: int | None = None
        self._tail = collections.deque(maxlen=60)
        self._reader: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._quiet_gpu = False
        self.failure: str | None = None  # why the server stopped working (a failed probe)
        self._monitor: threading.Thread | None = None

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
        self.workspace = Path(tempfile.mkdtemp(prefix=f"ws-{os.getpid()}-", dir=workspace_root()))
        try:
            self.model_names = write_repository(self.model, self.settings, self.workspace / "models")
            write_backends(self.workspace / "backends", paths)
            self.internal_http_port, self.internal_grpc_port = free_ports(2)
            self._spawn(paths)  # before the front: no fork while gRPC's threads run
            self._wait_ready(timeout)
            # the public ports open once every model answered (a client retries until then, as it
            # would while tritonserver loads)
            try:
                self.front = Front(self.host, self.http_port, self.grpc_port, "127.0.0.1", self.internal_http_port,
                                   self.internal_grpc_port, max_request_bytes=self.max_request_bytes,
                                   read_timeout=self.read_timeout, request_timeout=self.request_timeout,
                                   grace=self.exit_timeout).start()
            except OSError as e:
                raise ServerError(f"cannot listen on {self.host}: {e}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, paths: dict) -> list[str]:
        gpu = self.settings.device != "cpu" and "CUDAExecutionProvider" in str(onnx_providers(self.settings.device))
        args = {"model-repository": self.workspace / "models", "backend-directory": self.workspace / "backends",
                "disable-auto-complete-config": None,
                # tritonserver on this machine only, behind byolkit's front (serving/front.py) on the public ports
                "http-address": "127.0.0.1", "http-port": self.internal_http_port,
                "grpc-address": "127.0.0.1", "grpc-port": self.internal_grpc_port,
                "metrics-address": self.host, "metrics-port": self.metrics_port,
                "allow-gpu-metrics": str(gpu).lower(), "exit-timeout-secs": self.exit_timeout,
                "log-info": str(self.verbose).lower(),
                # every model of the repository loaded at start, none later: no model-repository API
                "model-control-mode": "none", "strict-readiness": "true"}
        if not gpu:
            args["pinned-memory-pool-byte-size"] = 0
        self._quiet_gpu = not gpu
        cmd = [str(paths["binary"])] + [f"--{k}" if v is None else f"--{k}={v}" for k, v in args.items()]
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

    @property
    def internal_http_url(self) -> str:
        """tritonserver's own HTTP port (127.0.0.1, behind the front): where readiness is probed."""
        return f"http://127.0.0.1:{self.internal_http_port}"

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.internal_http_url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def _private_segments(self):
        """The python backend creates its shared memory 0644 whatever the umask: made 0600 as soon as
        it appears (it carries the requests' images and the embeddings)."""
        for seg in shm_segments(self.shm_prefix):
            with contextlib.suppress(OSError):
                if seg.stat().st_mode & 0o077:
                    seg.chmod(0o600)

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._stop_requested.is_set():
            self._private_segments()
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                  + self.log_tail())
            if self.ready() and all(self._get(f"/v2/models/{n}/ready") == 200 for n in self.model_names) \
                    and self.probe(timeout=PROBE_TIMEOUT_S) is None:
                self._private_segments()
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
        """Block until request_stop(), until tritonserver dies or until a readiness probe fails; then
        stop -> exit status. Raises ServerError when the server died or failed."""
        if self.probe_interval and self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="readiness-probe", daemon=True)
            self._monitor.start()
        front = self.front
        while self.alive() and front.alive() and not self._stop_requested.wait(0.2):
            pass
        if not front.alive() and self.failure is None and not self._stop_requested.is_set():
            self.failure = f"the front on the public ports stopped ({front.error!r})"
        died = not self.alive() and self.failure is None and not self._stop_requested.is_set()
        if self.failure:
            self.kill()  # broken: no point waiting for a graceful stop
        code = self.stop()
        if died:
            raise ServerError(f"tritonserver exited unexpectedly with status {code}:\n" + self.log_tail())
        if self.failure:
            raise ServerError(f"{self.failure.rstrip('.')}; the server was stopped")
        return code

    # -- readiness: a real inference through every model's backend stub ---------------------------
    def _probe_request(self, name: str) -> tuple[bytes, dict]:
        """A one-item request for `name` in the binary-data extension of the KServe v2 HTTP protocol."""
        from .repository import IMAGE_INPUT

        m = self.model
        if name == m.name:
            datatype = "UINT8" if m.input_type == "TYPE_UINT8" else "FP32"
            shape = [1, *m.input_dims]
            raw = bytes(math.prod(m.input_dims) * (1 if datatype == "UINT8" else 4))  # zeros: a black image
            inp = {"name": m.input_name, "datatype": datatype, "shape": shape}
        else:
            png = _probe_png()
            raw = len(png).to_bytes(4, "little") + png
            inp = {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1, 1]}
        inp["parameters"] = {"binary_data_size": len(raw)}
        header = json.dumps({"inputs": [inp], "outputs": [{"name": "embeddings"}]}).encode()
        return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}

    def probe(self, timeout: float = PROBE_TIMEOUT_S) -> str | None:
        """One inference through each model -> None when all answered, else what went wrong.
        A timeout gives "timeout: ..." (a busy server may be slow; see _watch)."""
        for name in self.model_names:
            body, headers = self._probe_request(name)
            req = urllib.request.Request(f"{self.internal_http_url}/v2/models/{name}/infer", data=body,
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    r.read()
            except urllib.error.HTTPError as e:
                try:
                    message = json.loads(e.read() or b"{}").get("error", str(e))
                except ValueError:
                    message = str(e)
                if e.code == 503 and "queue" in message:  # busy: the queue is full, the model works
                    continue
                return f"model {name}: {message}"
            except TimeoutError as e:
                return f"timeout: model {name}: no answer within {timeout:.0f} s ({e})"
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    return f"timeout: model {name}: no answer within {timeout:.0f} s"
                return f"model {name}: {reason}"
        return None

    def _watch(self):
        """Probe every probe_interval seconds; a model that answers with an error (a dead backend stub
        answers "Stub process ... is not healthy") or PROBE_TIMEOUTS_FATAL timeouts in a row fail the server."""
        timeouts = 0
        while not self._stop_requested.wait(self.probe_interval):
            if not self.alive():
                return
            problem = self.probe(timeout=PROBE_TIMEOUT_S)
            if problem is None:
                timeouts = 0
                continue
            if problem.startswith("timeout: "):
                timeouts += 1
                if timeouts < PROBE_TIMEOUTS_FATAL:
                    continue
            if self._stop_requested.is_set():  # a stop under way: models unloading, not a failure
                return
            self.failure = f"readiness probe failed: {problem.removeprefix('timeout: ')}"
            with contextlib.suppress(ValueError, OSError):
                self.log.write(f"byolkit: {self.failure}\n")
                self.log.flush()
            self._stop_requested.set()
            return

    def kill(self):
        if self.alive():
            self.process.kill()

    def _kill_group(self):
        """SIGKILL whatever is left of tritonserver's process group (its backend stubs): after
        tritonserver exits, an orphaned stub would keep serving nothing and hold the log pipe."""
        pgid = self.process.pid  # start_new_session: tritonserver leads its own group
        from_group = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                        from_group.append(int(entry.name))
        self.killed_leftovers += from_group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def stop(self) -> int | None:
        """Stop serving and clean up; idempotent -> 0 for a clean stop, else tritonserver's exit status.

        The front closes the public ports: requests in flight finish (up to the exit timeout), idle
        connections are closed. Then tritonserver gets SIGINT: it finishes what is left, unloads the
        models (the stubs exit and free their shared memory) and exits. Then anything left of its
        process group is killed and its shared memory removed.
        """
        self._stop_requested.set()
        if self.front is not None:  # first: its requests in flight finish, and it holds no connection to tritonserver
            self.front.stop()
            self.front = None
        if self.process is not None:
            died = self.process.poll() is not None
            if not died:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(self.exit_timeout + 15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self._kill_group()  # stubs outliving tritonserver; the log pipe then reaches its end
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self._reader is None or not self._reader.is_alive():
                self.process.stdout.close()  # never while the reader blocks on it (that would deadlock)
            self.process_returncode = self.returncode = self.process.returncode
            # an HTTP connection still open to tritonserver (none: the front's are closed by now) makes it wait
            # the whole exit timeout, then exit 1 without unloading: a stop as asked, its leftovers removed here
            self.exit_timeout_expired = "Exit timeout expired" in self.log_tail(5)
            if self.exit_timeout_expired and not died:
                self.returncode = 0
            self.process = None
        # a clean shutdown leaves nothing here; whatever is left (a crash, an expired exit timeout) is removed
        left = shm_segments(self.shm_prefix)
        if not self.exit_timeout_expired:
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


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
refused request as a success). The models are loaded once at start: the model-repository API
(load, unload) is off. /v2/health/ready answers only once a real inference through every model
succeeded, and the server exits (status 1) when a later probe fails or tritonserver dies.
Once ready, one JSON line with the URLs goes to stdout.

The HTTP and gRPC ports are byolkit's front (serving/front.py); tritonserver listens behind it on
two loopback ports of its own. The front refuses a request above --max-request-bytes before it
holds it (HTTP 413, gRPC RESOURCE_EXHAUSTED), closes an HTTP body that stops arriving for
--read-timeout seconds (408), answers invalid JSON and a JSON integer out of its datatype's
range (a UINT8 of 300) with 400, and passes everything else on unchanged.

A repository's instance groups and TensorRT settings are Triton's onnxruntime backend's; here
--instances and --device decide (the nvidia-pytriton wheel has no onnxruntime backend: the
models run on its python backend, which runs ONNX Runtime).

SIGINT (Ctrl-C) or SIGTERM stops the server after its in-flight requests (a second one, a second
or more later, kills it); idle client connections are closed, requests in flight may take up
to --exit-timeout. Exit status: 0 stopped cleanly, 1 the server failed (or
died, or a readiness probe failed), 2 bad input.

Examples:
  python -m serving.server --model runs/c10/model.onnx
  python -m serving.server --model triton_repo --host 0.0.0.0 --instances 2 --max-queue-delay-us 5000
  python -c "from serving.client import EmbeddingClient; \\
      print(EmbeddingClient('grpc://127.0.0.1:8001').embed(['a.jpg']).shape)"
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
    p.add_argument("--max-queue-size", type=_positive, default=ServingSettings.max_queue_size, metavar="N",
                   help="requests waiting per model beyond which new ones are refused at once with Triton's "
                        "'Exceeds maximum queue size' (HTTP 503, gRPC UNAVAILABLE: server busy, retry later; "
                        "default %(default)s; with dynamic batching only)")
    p.add_argument("--max-request-bytes", type=_positive, default=MAX_REQUEST_BYTES, metavar="N",
                   help="refuse requests larger than this before they are held: HTTP 413 (a Content-Length above "
                        "it at once, a chunked or compressed body as soon as it goes over), gRPC RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--read-timeout", type=_positive_float, default=READ_TIMEOUT_S, metavar="S",
                   help="an HTTP request body that stops arriving for S seconds gets 408 and its connection is "
                        "closed (default %(default)g)")
    p.add_argument("--request-timeout", type=_positive_float, default=REQUEST_TIMEOUT_S, metavar="S",
                   help="longest a request may wait for the model server: HTTP 504, and the most a gRPC deadline "
                        "may be (default %(default)g)")
    p.add_argument("--probe-interval", type=float, default=5.0, metavar="S",
                   help="every S seconds one real inference runs through each model; when one fails (a dead "
                        "backend stub) the server stops and exits with status 1 (default 5; 0 turns it off)")
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
                               max_image_bytes=args.max_image_bytes, max_queue_size=args.max_queue_size,
                               image_model=not args.no_image_model)
    try:
        server = EmbeddingServer(args.model, model_name=args.model_name, host=args.host, http_port=args.http_port,
                                 grpc_port=args.grpc_port, metrics_port=args.metrics_port, settings=settings,
                                 exit_timeout=args.exit_timeout, probe_interval=args.probe_interval,
                                 max_request_bytes=args.max_request_bytes, read_timeout=args.read_timeout,
                                 request_timeout=args.request_timeout, verbose=args.verbose)
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
    how = f"tritonserver exit status {server.process_returncode}"
    if server.exit_timeout_expired:
        how = (f"tritonserver waited --exit-timeout {server.exit_timeout} s for open HTTP connections, then exited "
               "without unloading the models")
    if server.killed_leftovers:
        how += f"; killed {len(server.killed_leftovers)} leftover process(es) of its group"
    print(f"stopped ({how})", file=sys.stderr)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
