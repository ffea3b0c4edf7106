"""Helpers for the serving tests: the real `python -m serving.server` in a subprocess on free ports.

Every server started here is stopped by its fixture's finaliser (SIGTERM, then SIGKILL if it
hangs), and `leaks()` reports what a stopped server left behind: live processes of its tree,
shared-memory segments under its prefix, its workspace.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def free_ports(n: int = 3) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tree_pss_mib(pid: int) -> float:
    """Memory of a process and its descendants: the sum of their proportional set sizes in MiB (memory
    they share, such as the python backend's shared memory, counted once rather than in each)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            total += sum(int(line.split()[1]) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                         if line.startswith("Pss:"))
        except OSError:
            pass
    return total / 1024


class ServerProcess:
    """`python -m serving.server` with the given arguments, on free local ports."""

    def __init__(self, model, tmp: Path, *extra, ignore_sigint: bool = False):
        self.http_port, self.grpc_port, self.metrics_port = free_ports()
        if "--exit-timeout" not in map(str, extra):  # a test's idle keep-alive HTTP client holds a stop this long
            extra = (*extra, "--exit-timeout", 5)
        self.args = [sys.executable, "-m", "serving.server", "--model", str(model), "--http-port", str(self.http_port),
                     "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *map(str, extra)]
        self.tmp, self.ignore_sigint = tmp, ignore_sigint
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.tree: list[int] = []

    def start(self, timeout: float = 180) -> ServerProcess:
        self.out, self.err = open(self.tmp / "server.out", "w+"), open(self.tmp / "server.err", "w+")  # noqa: SIM115
        # as `cmd &` in a non-interactive shell leaves it: SIGINT ignored
        pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if self.ignore_sigint else None
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=ENV, stdout=self.out, stderr=self.err,
                                     preexec_fn=pre)  # noqa: PLW1509 - the test process starts it from one thread
        deadline = time.monotonic() + timeout
        while True:
            text = (self.tmp / "server.out").read_text()
            if text.strip():
                self.info = json.loads(text.splitlines()[0])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.2)
        self.tree = children(self.proc.pid)
        return self

    @property
    def grpc_url(self) -> str:
        return self.info["grpc"]

    @property
    def http_url(self) -> str:
        return self.info["http"]

    def stderr(self) -> str:
        return (self.tmp / "server.err").read_text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *children(self.proc.pid)]:
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
        self.err.close()
        return self.proc.returncode

    def leaks(self, wait: float = 10) -> list[str]:
        """What the stopped server left: processes of its tree, its shared memory, its workspace."""
        deadline = time.monotonic() + wait
        while any(alive(p) for p in self.tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [f"process {p}" for p in self.tree if alive(p)]
        left += [f"/dev/shm/{p.name}" for p in Path("/dev/shm").glob(f"byolkit_{self.proc.pid}_*")]
        from serving.server import workspace_root
        left += [str(p) for p in workspace_root().glob(f"ws-{self.proc.pid}-*")]
        return left


# -- the exported model ---------------------------------------------------------------------------
SOURCE = "random:resnet18:small:32"
_exported: dict = {}


def exported_model(tmp_path_factory) -> Path:
    """One export per test session (export.onnx, verified against PyTorch), shared by the test files."""
    if "path" not in _exported:
        from export.onnx import export_onnx
        path = tmp_path_factory.mktemp("export") / "model.onnx"
        export_onnx(SOURCE, path)
        _exported["path"] = path
    return _exported["path"]


# -- images ----------------------------------------------------------------------------------------
def picture(seed: int, size=(44, 36)) -> Image.Image:
    """A smooth picture-like RGB image (gradients and a bright square), not square, not 32 px."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    arr = base + 40 * np.sin(x[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3)) \
        + 30 * np.cos(y[..., None] / rng.uniform(3, 9))
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a bomb's header: nothing else is read before refusing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
