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
