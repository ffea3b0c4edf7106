"""benchmarks/export_speed.py in its tiny configuration (the real numbers are in BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_export_speed_benchmark_runs_tiny(tmp_path, image_folder):
    out = tmp_path / "speed.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "benchmarks/export_speed.py", "--tiny", "--json", str(out),
                           "--real-images", str(image_folder), "--real-count", "4"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] and result["machine"]["cpus"] >= 1
    r18 = result["models"]["resnet18"]
    assert r18["exports"]["float32"]["max_abs_diff"] <= 1e-4 and r18["exports"]["float32"]["size_mb"] > 1
    assert r18["exports"]["int8"]["size_ratio_vs_float32"] > 3 and r18["exports"]["int8"]["size_mb"] > 0.1
    assert result["machine"]["int8_instructions"].keys() >= {"avx512_vnni", "avx_vnni"}  # reported, not required
    assert r18["real_images"]["images"] == 4 and r18["real_images"]["float32"]["max_abs_diff"] <= 1e-4
    for batch in ("1", "2"):
        speeds = r18["batches"][batch]["images_per_s"]
        assert set(speeds) == {"pytorch", "pytorch_cl", "ort", "ort_uint8", "ort_int8"} and min(speeds.values()) > 0
        assert r18["batches"][batch]["int8_vs_float32"] > 0
        assert r18["batches"][batch]["ratio_vs_pytorch"]["ort"] > 0
        assert 0 < r18["batches"][batch]["cpu_share"] <= 1.5  # the contention signal BENCHMARKS.md relies on
