"""The app's memory under large uploads: RSS of `python -m app` before and after adding very large
images from the page, and after searching with one.

    python benchmarks/app_memory.py --model model.onnx --json benchmarks/results/app_memory.json

Makes six 8000 x 8000 PNGs (smooth gradients: about 1 MB each, 64 megapixels, as a camera-less
attacker would send), a small index of generated images, starts `python -m app --index ... --model
...` on a free local port, and through Gradio's own client (the page's API) adds the six images
in one request on the Index tab, then searches with one on the Search tab. Reported: the app's
resident memory (VmRSS) after start, after the add, after the search, and its peak (VmHWM), in MiB;
and whether the app's temporary folder is gone after it stops.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def big_png(path: Path, size: int, seed: int) -> Path:
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size].astype(np.uint32)
    pixels = np.stack([(x * 255 // size + seed * 40) % 256, (y * 255 // size) % 256, ((x + y) // 64 + seed) % 256], -1)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path, compress_level=6)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported encoder (python -m export.onnx)")
    p.add_argument("--images", type=int, default=6, help="large images added in one request (default %(default)s)")
    p.add_argument("--size", type=int, default=8000, help="their width and height (default %(default)s)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    from gradio_client import Client, handle_file
    work = Path(tempfile.mkdtemp(prefix="app-memory-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_TEMP_DIR=str(work / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1")
    small = work / "small"
    small.mkdir()
    from PIL import Image
    for i in range(8):
        Image.new("RGB", (64, 48), (i * 30, 100, 200 - i * 20)).save(small / f"s{i}.png")
    subprocess.run([sys.executable, "-m", "app.index", "build", "--images", str(small), "--out", str(work / "ix"),
                    "--model", args.model, "--no-progress"], cwd=ROOT, env=env, check=True, capture_output=True)
    print(f"making {args.images} {args.size}x{args.size} PNGs ...", file=sys.stderr)
    big = [big_png(work / f"big{i}.png", args.size, i) for i in range(args.images + 1)]
    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "app", "--index", str(work / "ix"), "--model", args.model,
                            "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or app.poll() is not None:
                    raise SystemExit(f"the app did not start: {app.stdout.read() if app.poll() is not None else ''}")
                time.sleep(1)
        time.sleep(2)
        result = {"started_mib": round(mib(app.pid, "VmRSS"))}
        started = time.perf_counter()
        status, _ = client.predict([handle_file(str(b)) for b in big[:args.images]], "", api_name="/add")
        result.update(add_seconds=round(time.perf_counter() - started, 1), add_status=status,
                      after_add_mib=round(mib(app.pid, "VmRSS")), peak_after_add_mib=round(mib(app.pid, "VmHWM")))
        _gallery, status = client.predict(handle_file(str(big[-1])), 5, api_name="/search")
        result.update(search_status=status, after_search_mib=round(mib(app.pid, "VmRSS")),
                      peak_mib=round(mib(app.pid, "VmHWM")))
    finally:
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(60)
        except subprocess.TimeoutExpired:
            app.kill()
    left = [str(f.relative_to(work)) for f in (work / "gradio").rglob("*") if f.is_file()]
    result.update(files_left_after_stop=len(left), images=args.images, size=args.size,
                  png_mib=round(big[0].stat().st_size / 2**20, 2), model=str(args.model),
                  command=" ".join(["python", "benchmarks/app_memory.py", *(argv or sys.argv[1:])]),
                  date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cores")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
