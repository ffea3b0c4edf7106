"""The one-shot GPU script's dress rehearsal: both parts in --tiny mode on the CPU, as the GPU machine
would run them: from a copy of the tree with PYTHONPATH on it, no byolkit installed (python -S: the
editable install's .pth finder is never loaded), no ../shared (the data folder is generated here)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "cat", "ship")


def cifar_like_zip(path: Path, per_class: int, seed: int) -> None:
    """CIFAR-10's layout: class/NNNN.jpg, 32x32 JPEGs, classes told apart by colour."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                arr = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                arr[..., c] += 150
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                zf.writestr(f"{name}/{i:04d}.jpg", buf.getvalue())


def test_oneshot_tiny_rehearsal_without_the_installed_package(tmp_path):
    tree = tmp_path / "tree"  # no ../shared beside it
    for folder in ("contract", "trainer", "export", "serving", "benchmarks"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "data", "results"))
    data = tree / "benchmarks" / "data" / "cifar10-subset"  # where the script looks by default
    data.mkdir(parents=True)
    cifar_like_zip(data / "train.zip", 12, 0)
    cifar_like_zip(data / "test.zip", 4, 1)
    out = tmp_path / "out"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           # the tree, then the libraries; with -S no .pth file runs, so the editable byolkit is not found
           "PYTHONPATH": os.pathsep.join([str(tree), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.run([sys.executable, "-S", "benchmarks/gpu_oneshot.py", "--tiny", "--part", "all",
                           "--out", str(out)], cwd=tree, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    smoke = json.loads((out / "gpu_oneshot_smoke.json").read_text())
    assert smoke["complete"] and smoke["passed"]
    assert {k: c["status"] for k, c in smoke["checks"].items()} == dict.fromkeys(
        ("environment", "collectives", "pretrain_resume", "stream_pipeline", "evaluate_knn"), "ok")
    assert smoke["environment"]["trainer_from"] == str(tree / "trainer")
    collectives = smoke["checks"]["collectives"]
    assert collectives["backend"] == "gloo" and collectives["trainer_from"] == str(tree / "trainer")
    assert collectives["sum"] == [1.0, 2.0] and collectives["gathered"] == [{"rank": 0}]
    resumed = smoke["checks"]["pretrain_resume"]["summary"]
    assert resumed["steps"] == 6 and resumed["world_size"] == 1 and 0 <= resumed["knn_top1"] <= 1
    assert 0 <= smoke["checks"]["evaluate_knn"]["top1"] <= 1

    figures = json.loads((out / "gpu_oneshot_figures.json").read_text())
    statuses = {k: c["status"] for k, c in figures["checks"].items()}
    assert statuses == {"environment": "ok", "resnet50_224_phases": "ok", "resnet50_224_trainer_memory": "ok",
                        "resnet50_224_trainer_stream": "ok", "cifar10_resnet18_knn_vs_time": "ok",
                        "onnx_parity": "ok", "resnet50_224_phases_compiled": "skipped"}
    assert figures["checks"]["resnet50_224_trainer_stream"]["pipeline"] == "stream"
    assert 0 <= figures["checks"]["resnet50_224_trainer_memory"]["data_wait_fraction"] < 1
    assert figures["checks"]["cifar10_resnet18_knn_vs_time"]["knn_curve"]
    parity = figures["checks"]["onnx_parity"]
    assert parity["min_cosine"] > 0.999 and parity["providers"] == ["CPUExecutionProvider"] and "note" in parity
    assert (out / "gpu_oneshot_smoke.log").read_text().count("$ ") == 5  # the commands, for the record
