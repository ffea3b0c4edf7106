"""benchmarks/peer_speed.py: byolkit against byol-pytorch, in a tiny configuration (a few seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "peer_speed.py"
TINY = ["--batch-size", "8", "--image-size", "16", "--rounds", "1", "--steps-per-round", "1",
        "--warmup", "0", "--hidden-dim", "64", "--projection-dim", "32", "--num-images", "16"]


def test_peer_speed_tiny(tmp_path):
    # byol-pytorch is in the test extra: a missing install fails here with the script's one-line error
    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"byolkit", "byol-pytorch"}
    for name in ("byolkit", "byol-pytorch"):
        assert result["results"][name]["images_per_s"] > 0
        assert len(result["results"][name]["images_per_s_rounds"]) == 1
    assert result["ratio"] > 0
    assert result["settings"]["batch_size"] == 8 and result["settings"]["image_size"] == 16
    assert result["machine"]["torch"] and result["byol_pytorch_version"]
    assert "ratio byolkit/byol-pytorch" in proc.stdout


def test_peer_speed_without_byol_pytorch(tmp_path):
    """Without byol-pytorch the script says so in one line and exits 2, with no traceback."""
    code = ("import runpy, sys; sys.modules['byol_pytorch'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, *{TINY!r}]; "
            f"sys.exit(runpy.run_path({str(SCRIPT)!r}, run_name='__main__'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "byol-pytorch is not importable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_peer_knn_mode_tiny(image_zip, tmp_path):
    """The kNN mode: three libraries' recipes for the same (tiny) budget, then the same kNN."""
    out = tmp_path / "knn.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--budget", "1.5", "--tiny", "--batch-size", "8",
                           "--workers", "0", "--train", str(image_zip), "--test", str(image_zip),
                           "--out", str(tmp_path / "runs"), "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"random_init", "byolkit", "byol-pytorch", "lightly"}
    for name in ("byolkit", "byol-pytorch", "lightly"):
        r = result["results"][name]
        assert r["steps"] > 0 and r["images_per_s"] > 0 and r["train_seconds"] >= 1.5 * 0.9
        assert 0 <= r["knn"]["top1"] <= r["knn"]["top5"] <= 1 and r["recipe"]
    assert result["data"]["train_images"] == 18 and result["data"]["image_size"] == 16
    assert result["versions"]["lightly"] and result["versions"]["byol-pytorch"]
    assert "kNN top-1" in proc.stdout


def test_peer_knn_mode_needs_labelled_data(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--budget", "1", "--train", str(tmp_path / "nope.zip"),
                           "--test", str(tmp_path / "nope.zip")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
