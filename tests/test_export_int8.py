"""export.onnx --int8 (export.quantize): the guard, the calibration split, and the int8 file in the
server, the app and the index.

One float export (the session's random ResNet-18, 32 px) and one int8 export of it are made per
module, calibrated on generated picture-like images; the broken quantisation is a real one too,
calibrated on constant grey images while the guard holds back the same real pictures.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import REPO_ROOT
from serving_util import ServerProcess, encode, exported_model, picture

import export.quantize as xq
from contract.deployment import read_onnx_metadata
from export.onnx import main as export_main

N_IMAGES = 96  # 48 calibrate, 48 held back
MIN_RECALL = 0.8  # the random encoder's embeddings are close together; a real encoder's are not (BENCHMARKS.md)
SPLIT = {"calibration_images": N_IMAGES // 2, "held_back": N_IMAGES // 2}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    for i in range(N_IMAGES):
        picture(1000 + i, size=(40 + i % 9, 36 + i % 5)).save(root / f"p{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def int8(float_model, pictures, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    report = xq.export_int8(float_model, out, pictures, min_recall=MIN_RECALL, **SPLIT)
    return out, report


def test_split_is_disjoint_deterministic_and_sized():
    for n, c, h in [(1000, 256, 256), (100, 256, 256), (30, 10, 11), (23, 256, 256)]:
        calib, held = xq.split_calibration(n, c, h)
        assert not set(calib) & set(held)
        assert len(held) >= xq.GUARD_K + 1 and len(calib) >= 1 and len(calib) + len(held) <= n
        again = xq.split_calibration(n, c, h)
        assert np.array_equal(calib, again[0]) and np.array_equal(held, again[1])
    assert len(xq.split_calibration(1000, 256, 128)[1]) == 128
    with pytest.raises(xq.QuantizationError):
        xq.split_calibration(11, 256, 256)  # nothing left to calibrate on


def test_the_export_never_calibrates_on_held_back_images(float_model, pictures, tmp_path, monkeypatch):
    seen = []
    real = xq.load_pixels
    monkeypatch.setattr(xq, "load_pixels", lambda c, idx, pre: seen.append(list(idx)) or real(c, idx, pre))
    xq.export_int8(float_model, tmp_path / "m.onnx", pictures, min_recall=0, **SPLIT)
    calib, held = seen
    assert len(calib) == len(held) == N_IMAGES // 2 and not set(calib) & set(held)


def test_int8_export_records_the_guard_and_its_source(int8, float_model):
    path, report = int8
    meta = read_onnx_metadata(path)
    fmeta = read_onnx_metadata(float_model)
    q = meta["quantization"]
    assert meta["weights"] == "int8" and meta["float_fingerprint"] == fmeta["fingerprint"] == q["float_fingerprint"]
    assert meta["fingerprint"] != fmeta["fingerprint"]
    g = q["guard"]
    assert g["passed"] and g["recall_at_10"] >= MIN_RECALL and g["held_back"] == N_IMAGES // 2
    assert g["preprocessing_identical"] is True and 0.9 < g["cosine_min"] <= g["cosine_mean"] <= 1
    assert q["calibration"]["images"] == N_IMAGES // 2 and q["method"] == xq.DEFAULT_METHOD
    assert report["size_ratio"] > 3  # int8 weights: about a quarter of the float file


def test_preprocessing_stays_float_and_untouched(int8, float_model):
    """No QuantizeLinear between the uint8 input and the first convolution's input: the same nodes as
    the float graph, computing a bit-identical tensor (checked by the guard: preprocessing_identical)."""
    q, f = onnx.load(int8[0]), onnx.load(float_model)
    names, tensor = xq.preprocessing_nodes(f)
    q_ops = {n.name: n.op_type for n in q.graph.node}
    f_ops = [n.op_type for n in f.graph.node if n.name in names]
    assert sorted(f_ops) == sorted(q_ops[n] for n in names)
    assert {"Cast", "Div", "Sub", "Transpose"} <= set(f_ops) and "QuantizeLinear" not in f_ops
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in q.graph.node)


def test_guard_refuses_a_broken_quantisation_and_writes_nothing(float_model, pictures, tmp_path, monkeypatch,
                                                               capsys):
    """Calibrated on constant grey images, the activation ranges miss real pictures: refused, exit 2."""
    real = xq.quantize
    monkeypatch.setattr(xq, "quantize", lambda m, out, feed, name, method: real(
        m, out, np.full_like(feed, 128), name, method))
    out = tmp_path / "sub" / "broken.onnx"
    code = export_main(["--checkpoint", str(float_model), "--out", str(out), "--int8", "--calibration",
                        str(pictures), "--calibration-images", "48", "--held-back", "48", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: int8 model refused, nothing written: recall@10") and "below --min-recall 0.95" in err
    assert not out.exists() and not list(tmp_path.rglob("*.onnx*"))


def test_bad_int8_options(float_model, pictures, tmp_path, capsys):
    cases = [["--int8"], ["--int8", "--calibration", str(tmp_path / "none")],
             ["--int8", "--calibration", str(pictures), "--fp16"],
             ["--int8", "--calibration", str(pictures), "--min-recall", "1.5"],
             ["--calibration", str(pictures)]]
    for extra in cases:
        code = export_main(["--checkpoint", str(float_model), "--out", str(tmp_path / "x.onnx"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, (extra, err)
    assert not list(tmp_path.iterdir())


def test_int8_from_a_checkpoint_on_the_command_line(pictures, tmp_path):
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--checkpoint", "random:resnet18:small:32", "--out",
                        str(out), "--int8", "--calibration", str(pictures), "--calibration-images", "48",
                        "--held-back", "48", "--min-recall", str(MIN_RECALL), "--quiet"],
                       check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["float_export"]["verification"]["passed"] and report["metadata"]["weights"] == "int8"
    assert read_onnx_metadata(out)["float_fingerprint"] == report["float_export"]["metadata"]["fingerprint"]


# -- the int8 file downstream ---------------------------------------------------------------------------
def test_int8_in_the_engine_and_the_real_server(int8, float_model, tmp_path):
    from serving.client import EmbeddingClient
    from serving.engine import OnnxEncoder

    pixels = np.stack([OnnxEncoder(int8[0], device="cpu").decode(encode(picture(s))) for s in range(4)])
    got = OnnxEncoder(int8[0], device="cpu").embed_pixels(pixels)
    ref = OnnxEncoder(float_model, device="cpu").embed_pixels(pixels)
    assert got.shape == ref.shape and (got * ref).sum(1).min() > 0.99
    server = ServerProcess(int8[0], tmp_path).start()
    try:
        with EmbeddingClient(server.grpc_url) as client:
            assert client.metadata()["quantization"]["guard"]["passed"]
            served = client.embed([encode(picture(s)) for s in range(4)])
        assert np.allclose(served, got, atol=1e-5)
    finally:
        server.stop()


def test_int8_in_a_triton_repository(int8, tmp_path):
    from export.triton import RepositoryError, build_config, write_repository
    write_repository(int8[0], tmp_path / "repo")
    assert (tmp_path / "repo" / "byol_encoder" / "1" / "model.onnx").is_file()
    with pytest.raises(RepositoryError, match="int8"):
        build_config(int8[0], kind="gpu", tensorrt=True)


def test_index_refuses_the_other_form_until_rebuilt(int8, float_model, pictures, tmp_path, capsys):
    from app.index import main as index_main
    index = tmp_path / "index"
    assert index_main(["build", "--images", str(pictures), "--out", str(index), "--model", str(float_model),
                       "--no-progress"]) == 0
    capsys.readouterr()
    query = str(pictures / "p000.png")
    assert index_main(["search", "--index", str(index), "--image", query, "--model", str(int8[0])]) == 2
    err = capsys.readouterr().err
    assert "float32 form of model" in err and "int8 form" in err and "--force" in err

    assert index_main(["build", "--images", str(pictures), "--out", str(index), "--model", str(int8[0]),
                       "--force", "--no-progress"]) == 0
    assert index_main(["search", "--index", str(index), "--image", query, "--model", str(int8[0]), "--json"]) == 0
    capsys.readouterr()
    assert index_main(["info", "--index", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["weights"] == "int8" and info["model"]["quantization"]["guard"]["recall_at_10"] >= MIN_RECALL
    assert index_main(["add", "--index", str(index), "--images", str(pictures), "--model", str(float_model)]) == 2
    assert "int8 form of model" in capsys.readouterr().err


def test_the_page_shows_the_int8_figures(int8, pictures, tmp_path):
    from app.embedding import open_encoder
    from app.ops import build_index
    from app.ui import AppState

    encoder = open_encoder(str(int8[0]))
    index, _ = build_index(encoder, str(pictures), tmp_path / "ix", progress=False)
    text = AppState(index, encoder).describe()
    guard = read_onnx_metadata(int8[0])["quantization"]["guard"]
    assert "| int8 |" in text and f"recall@10 {guard['recall_at_10']}" in text
