"""benchmarks/pretrain_speed.py in a tiny CPU configuration (seconds), and its MFU arithmetic."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "pretrain_speed.py"
TINY = ["--preset", "cpu-quick", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "4",
        "--num-images", "8", "--set", "data.image_size=16", "--set", "model.projector_hidden_dim=32",
        "--set", "model.predictor_hidden_dim=32"]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("pretrain_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_speed_tiny_cpu(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--peak-flops", "1e12", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["batch_size"] == 4 and r["image_size"] == 16 and r["arch"] == "resnet18_w16"
    assert r["precision"] == "bf16" and r["steps"] == 2  # the preset's precision
    assert set(r["phases_ms"]) == {"data", "augment", "forward", "backward", "optimizer", "ema"}
    assert all(v > 0 for v in r["phases_ms"].values())
    assert abs(sum(r["phase_share"].values()) - 1) < 1e-9
    # on CPU the phases are the whole step (plain timers around synchronous work)
    assert sum(r["phases_ms"].values()) <= r["step_ms"] * 1.01
    assert r["images_per_s"] == pytest.approx(4 * 1000 / r["step_ms"])
    assert r["flops_per_step"] > 0
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 1e12)
    assert "images/s" in proc.stdout and "MFU" in proc.stdout


def test_flop_count_is_three_forward_passes_of_the_networks(speed):
    """One step's FLOPs: online forward on both views (1x each), its backward (~2x), the target's
    forward (1x each): between 3x and 4x of two online forward passes; the augmentations add no
    matrix work."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = speed.build_config(argparse.Namespace(
        preset="cpu-quick", set=["data.image_size=16", "model.projector_hidden_dim=32",
                                 "model.predictor_hidden_dim=32"], batch_size=4, compile=False, precision="fp32"))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    step = speed.Step(cfg, torch.device("cpu"), images, seed=0)
    total = speed.count_step_flops(step)
    x = torch.randn(4, 3, 16, 16)
    with FlopCounterMode(display=False) as c:
        step.byol.projector(step.byol.encoder(x))
    online_one_view = c.get_total_flops()
    assert 2 * 3 * online_one_view <= total <= 2 * 4.2 * online_one_view


def test_peak_table_and_bad_arguments(speed, tmp_path, capsys):
    assert speed.peak_flops_for("NVIDIA H200") == 989e12
    assert speed.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12  # the SXM part's name
    assert speed.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert speed.peak_flops_for("NVIDIA RTX A6000") == 155e12
    assert speed.peak_flops_for("Some Future GPU") is None
    for bad, message in ((["--steps", "0"], "--steps must be at least 1"),
                         (["--preset", "nope"], "unknown preset"),
                         (["--set", "model.nope=1"], "has no setting"),
                         (["--data", str(tmp_path / "missing")], "no such file")):
        with pytest.raises(SystemExit) as exit_info:
            speed.main(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
