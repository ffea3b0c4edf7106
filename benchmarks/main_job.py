"""The main job as a new user meets it: `python -m app` from nothing to a usable page, twice.

    python benchmarks/main_job.py --work runs/bench-main-job --json benchmarks/results/main_job.json

Starts `python -m app --work WORK` (the shipped photos, every default), polls the page until it
answers, stops it with SIGINT, and records the seconds to the page and the JSON summary the job
printed; then the same again (the second run reuses the encoder, the export and the index).
WORK is emptied first. Extra arguments after `--` go to `python -m app`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, write_json  # puts the repository root on sys.path


def to_the_page(work: Path, port: int, extra: list[str], log: Path) -> dict:
    """One run of the main job -> {"seconds_to_page", "summary"}."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--work", str(work), "--port", str(port),
                                 "--no-progress", *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            while proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                        break
                except OSError:
                    time.sleep(0.25)
            seconds = time.perf_counter() - started
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return {"seconds_to_page": round(seconds, 1), "summary": json.loads(lines[-1]) if lines else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench-main-job")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="arguments for python -m app (after --)")
    args = p.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "extra": args.extra}
    for name in ("first", "second"):
        results[name] = to_the_page(work / "data", args.port, args.extra, work / f"{name}.log")
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
