"""What the benchmark scripts share: the machine a figure comes from, the date, JSON results, running
the real commands, and the BYOL-against-random-initialisation comparison of the transfer benchmarks.

A script imports it from its own folder, which puts the repository root on sys.path:

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import ROOT, machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra) -> dict:
    """The machine a figure was measured on: OS, CPU, cores, Python, torch and its threads, the GPU
    (None without one); `extra` adds what a benchmark also depends on (library versions)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        pass
    else:
        info.update(torch=torch.__version__, threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return {**info, **extra}


def now() -> str:
    """The current UTC time, ISO 8601 to the second (a result's "date")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, result: dict, indent: int = 2) -> str:
    """Write `result` to `path` (its folder created); returns the text."""
    text = json.dumps(result, indent=indent)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def emit_json(path: str | Path | None, result: dict) -> int:
    """The end of a benchmark's main: `result` to `path` (when given) and to stdout; returns 0."""
    if path:
        write_json(path, result)
    print(json.dumps(result, indent=2))
    return 0


def run_command(command: list[str]) -> float:
    """Run a command from the repository root with the repository importable; its wall time in
    seconds. A failure exits with the command and the tail of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[1:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def finetune(module: str, flags: list[str], out: Path) -> tuple[dict, float, str]:
    """One `python -m trainer.<module>` fine-tuning run into `out`: its metrics.json, wall time and
    command line."""
    command = [sys.executable, "-m", f"trainer.{module}", "--no-progress", *flags, "--out", str(out)]
    seconds = run_command(command)
    return json.loads((out / "metrics.json").read_text()), seconds, " ".join(command[1:])


def byol_against_random(encoder: str, run_one: Callable[[str, Path], dict], out: Path,
                        line: Callable[[dict], str]) -> dict:
    """The same run twice, the same schedule and seed: from the BYOL `encoder`, and from
    `random:<encoder>` (its architecture, stem and preprocessing, fresh weights). `run_one(spec, out)`
    runs one; `line(result)` is what stderr shows of it."""
    random_spec = encoder if encoder.startswith("random:") else f"random:{encoder}"
    runs = {}
    for name, spec in (("byol", encoder), ("random", random_spec)):
        runs[name] = run_one(spec, out / name)
        print(f"{name:7s} {line(runs[name])}  ({runs[name]['seconds']:.0f} s)", file=sys.stderr)
    return runs


def report_transfer(path: Path, result: dict, runs: dict, metrics, shown=("date", "byol_minus_random")) -> int:
    """Add the BYOL-minus-random differences of `metrics` to `result`, write it to `path`, print the
    headline (the `shown` keys) on stdout."""
    result["runs"] = runs
    result["byol_minus_random"] = {k: runs["byol"][k] - runs["random"][k] for k in metrics}
    write_json(path, result)
    print(json.dumps({k: result[k] for k in shown}))
    return 0


def smooth_jpegs(root: Path, count: int, size: int) -> Path:
    """`count` generated JPEGs of `size` px: smooth colour fields, which compress like photos."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(root / f"{i:05d}.jpg", quality=90)
    return root


def transfer_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a GPU transfer benchmark (gpu_depth, gpu_segment): the flags they share
    (--out, --json, --workers, --tiny); each adds its data, encoder and schedule flags."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the run directories (default: a temporary one)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="seconds on a CPU: generated data, one epoch")
    return p


def run_transfer(args, tiny: tuple[Callable[[Path], tuple[list[str], str]], list[str]],
                 setup: Callable[[], tuple[list[str], str, list[str]]], compare: Callable, metrics) -> int:
    """The main of a GPU transfer benchmark (gpu_depth, gpu_segment): with --tiny, `tiny` is
    (tiny_data(folder) -> data flags and encoder, the schedule), on generated data in a scratch
    folder; otherwise `setup()` gives the data flags, the encoder and the schedule. `compare(encoder,
    data_flags, schedule, out)` runs the BYOL/random pair under args.out (default: in the scratch
    folder); the result goes to args.json."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "runs"
        if args.tiny:
            data_flags, encoder = tiny[0](Path(tmp) / "data")
            schedule = tiny[1]
        else:
            data_flags, encoder, schedule = setup()
        started = now()
        runs = compare(encoder, data_flags, schedule, out)
    result = {"date": started, "machine": machine(), "tiny": args.tiny,
              "settings": {k: str(v) for k, v in vars(args).items()}}
    return report_transfer(args.json, result, runs, metrics, shown=("date", "tiny", "byol_minus_random"))


def onnxruntime_info() -> dict:
    """ONNX Runtime's version and providers and the CPU's int8 instructions (for machine(**...))."""
    import onnxruntime as ort

    from export.quantize import int8_instructions
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "int8_instructions": int8_instructions()}
