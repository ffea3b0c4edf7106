"""The demo (the README's main command) and the benchmark scripts, in tiny configurations."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def train_test_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Labelled train and test folders: two colour-coded classes of noisy 32 px JPEGs."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for split, count in (("train", 24), ("test", 8)):
        for name, channel in (("reddish", 0), ("bluish", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                arr = (rng.random((32, 32, 3)) * 120).astype(np.uint8)
                arr[..., channel] += 120
                Image.fromarray(arr).save(root / split / name / f"{i}.jpg", quality=95)
    return root / "train", root / "test"


def run(*cmd, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, check=False, text=True, cwd=ROOT,
                          env=ENV,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_demo_trains_and_reports_knn_before_and_after(tmp_path):
    out = tmp_path / "demo"
    proc = run("-m", "trainer.demo", "--out", out, "--per-class", 30, "--time-budget", "4s")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    scores = result["knn_top1"]
    assert set(scores) == {"random init", "BYOL"}
    assert all(1 / 6 - 0.1 < v <= 1 for v in scores.values())  # six classes
    assert (out / "encoder.safetensors").is_file()
    assert len(list((tmp_path / "demo-images" / "train").rglob("*.png"))) == 6 * 30
    assert "kNN top-1 on held-out shapes" in proc.stderr


def test_demo_images_are_deterministic(tmp_path):
    sys.path.insert(0, str(ROOT))
    from trainer.synthetic import write_shape_classes as generate
    a, b = generate(tmp_path / "a", 2, seed=0), generate(tmp_path / "b", 2, seed=0)
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_cpu_quick_benchmark_runs_tiny(train_test_folders, tmp_path):
    train, test = train_test_folders
    out = tmp_path / "bench.json"
    run("benchmarks/pretrain_cpu_quick.py", "--train", train, "--test", test, "--budget", "3s", "--workers", 0,
        "--out", tmp_path / "run", "--json", out, "--set", "optim.batch_size=8",
        "--set", "model.projector_hidden_dim=64", "--set", "model.predictor_hidden_dim=64")
    result = json.loads(out.read_text())
    for key in ("pixels_32px", "random_init", "byol"):
        assert 0 <= result[key]["top1"] <= result[key]["top5"] <= 1
    assert result["train"]["steps"] > 0 and result["train"]["images_per_s_median"] > 0
    assert result["machine"]["cpus"] >= 1 and result["date"]


def test_gpu_benchmark_script_runs_tiny_on_cpu(train_test_folders, tmp_path):
    train, test = train_test_folders
    out = tmp_path / "gpu.json"
    run("benchmarks/gpu_pretrain.py", "--tiny", "--cifar-train", train, "--cifar-test", test, "--json", out)
    result = json.loads(out.read_text())
    assert result["resnet50_224"]["images_per_s"] > 0
    assert result["resnet50_224_stream"]["images_per_s"] > 0
    assert 0 <= result["resnet50_224_stream"]["data_wait_fraction"] <= 1
    step = result["resnet50_224_step"]
    assert step["flops_per_step"] > 0 and set(step["phases_ms"]) >= {"data", "forward", "backward", "ema"}
    assert step["mfu"] is None  # no peak FLOPs for a CPU
    assert result["cifar10_resnet18"]["steps"] == 2
    assert 0 <= result["cifar10_resnet18"]["final_knn_top1"] <= 1
