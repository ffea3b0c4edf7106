"""The index benchmarks in tiny configurations: benchmarks/index_scale.py and benchmarks/retrieval.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from app_util import make_colour_model
from conftest import REPO_ROOT

from contract.preprocess import Preprocessing
from trainer.checkpoint import save_encoder
from trainer.models import build_encoder

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def run(script, *args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *map(str, args)], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)


def test_index_scale_tiny(tmp_path):
    out = tmp_path / "scale.json"
    proc = run("index_scale.py", "--n", 3000, "--dim", 32, "--clusters", 20, "--latent", 8, "--queries", 100,
               "--flat-queries", 10, "--threads", 1, "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == {"flat", "hnsw", "ivfpq"}
    assert result["kinds"]["flat"]["latency"]["recall_at_10"] == 1.0
    for kind in ("hnsw", "ivfpq"):
        entry = result["kinds"][kind]
        assert entry["tuned"]["recall_held_out_sample"] >= 0.95 and entry["latency"]["recall_at_10"] >= 0.9
        assert entry["latency"]["median_ms"] > 0 and entry["faiss_bytes"] > 0 and entry["sweep"]
    assert "| hnsw |" in proc.stdout
    bad = run("index_scale.py", "--kinds", "lsh", "--n", 1000)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_retrieval_tiny(tmp_path, image_zip):
    torch.manual_seed(1)
    encoder, dim = build_encoder("resnet18", "small")
    save_encoder(tmp_path / "encoder.safetensors", encoder, arch="resnet18", stem="small", embedding_dim=dim,
                 preprocessing=Preprocessing(16, 16))
    # the ONNX row runs the app's embedding path; the stand-in model is not this encoder, only the path is tested
    onnx = make_colour_model(tmp_path / "colour.onnx")
    out = tmp_path / "retrieval.json"
    proc = run("retrieval.py", "--encoder", tmp_path, "--gallery", image_zip, "-k", 3, "--limit", 4,
               "--onnx", onnx, "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["images"] == 12 and result["classes"] == 3 and result["k"] == 3
    assert set(result["precision_at_k"]) == {"byol", "random_init", "pixels_32px", "byol_onnx"}
    assert all(0 <= v <= 1 for v in result["precision_at_k"].values())
    assert result["precision_at_k"]["pixels_32px"] == 1.0  # the classes differ by colour
    assert result["precision_at_k"]["byol_onnx"] == 1.0    # ... and the stand-in embeds colour
    missing = run("retrieval.py", "--encoder", tmp_path / "nothing", "--gallery", image_zip)
    assert missing.returncode == 2 and "error: " in missing.stderr
