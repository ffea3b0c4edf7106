"""export.onnx: round trips against PyTorch, dynamic batch, float16, metadata, and every bad input.

Exports are made once per module (module-scoped fixtures) at small input sizes; ResNet-50 runs at
64 px. The PyTorch references here are built independently of export.onnx where the source is a
file (trainer.checkpoint.load_encoder and the checkpoint's own projector weights).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import REPO_ROOT, image_bytes, make_image

import export.onnx as xo
from contract.deployment import (
    INPUT_FLOAT,
    INPUT_UINT8,
    METADATA_FIELDS,
    METADATA_KEY,
    OUTPUT,
    MetadataError,
    decode_metadata,
    read_onnx_metadata,
    read_onnx_metadata_props,
)
from contract.preprocess import Preprocessing
from trainer import __version__
from trainer.checkpoint import CheckpointError, load_encoder, save_checkpoint, save_encoder, weights_fingerprint
from trainer.config import apply_override, preset
from trainer.models import BYOL, build_encoder

RANDOM_CASES = {  # name -> (source, input size)
    "resnet18-small": ("random:resnet18:small:32", 32),
    "resnet18": ("random:resnet18:imagenet:64", 64),
    "resnet50": ("random:resnet50:imagenet:64", 64),
}


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def torch_embed(encoder, pre: Preprocessing, batch_uint8: np.ndarray, projector=None) -> np.ndarray:
    with torch.inference_mode():
        y = encoder(torch.from_numpy(pre.normalize(batch_uint8)))
        return (projector(y) if projector is not None else y).numpy()


# -- files to export from: an encoder file, a full checkpoint, a run directory --------------------
PROJ_HIDDEN, PROJ_DIM = 64, 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as trainer.pretrain leaves it (the cpu-quick preset's network, 24 px), with
    non-trivial BatchNorm statistics and a projector of 64 -> 32."""
    cfg = preset("cpu-quick")
    for o in (f"model.projector_hidden_dim={PROJ_HIDDEN}", f"model.projection_dim={PROJ_DIM}",
              "model.predictor_hidden_dim=16"):
        apply_override(cfg, o)
    torch.manual_seed(3)
    encoder, dim = build_encoder(cfg.model.arch, cfg.model.stem)
    model = BYOL(encoder, dim, PROJ_HIDDEN, PROJ_DIM, 16)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 24, 24), torch.randn(8, 3, 24, 24))  # running statistics move off 0 / 1
    model.eval()
    out = tmp_path_factory.mktemp("run") / "run"
    out.mkdir()
    save_checkpoint(out, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=7,
                    config=cfg.to_dict())
    save_encoder(out / "encoder.safetensors", model.encoder, arch=cfg.model.arch, stem=cfg.model.stem,
                 embedding_dim=dim, preprocessing=cfg.data.preprocessing(), step=7)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Lazily exported files, shared by the module: key -> (path, report)."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(key, source, **kwargs):
        if key not in cache:
            path = root / f"{key}.onnx"
            cache[key] = (path, xo.export_onnx(source, path, **kwargs))
        return cache[key]
    return get


# ============================================================================================
# Round trips
# ============================================================================================
@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_round_trip_uint8_matches_pytorch(case, exports):
    source, size = RANDOM_CASES[case]
    path, report = exports(case, source)
    v = report["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["min_cosine"] >= 0.99999
    assert v["images"]["noise"] > 0 and v["images"]["pictures"] > 0
    # independently of the report: fresh images through ONNX Runtime and through PyTorch
    encoder, _, info = xo.load_source(source)
    batch = images(5, size, seed=11)
    got = session(path).run([OUTPUT], {INPUT_UINT8: batch})[0]
    expected = torch_embed(encoder, info["preprocessing"], batch)
    assert got.shape == (5, info["embedding_dim"]) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4
    assert cosines(got, expected).min() >= 0.99999


def test_graph_interface_is_the_contract(exports):
    path, report = exports("resnet18-small", RANDOM_CASES["resnet18-small"][0])
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == (INPUT_UINT8, onnx.TensorProto.UINT8,
                                                                      ["batch", 32, 32, 3])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == (OUTPUT, onnx.TensorProto.FLOAT, ["batch", 512])
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [xo.DEFAULT_OPSET]
    assert model.ir_version == 8  # what opset 18 needs: ONNX Runtime >= 1.14 and TensorRT 8.6 read it
    ops = [n.op_type for n in model.graph.node]
    assert ops[:5] == ["Transpose", "Cast", "Div", "Sub", "Div"]  # layout change, scaling, normalisation
    assert "BatchNormalization" not in ops  # folded
    assert report["input"] == {"name": INPUT_UINT8, "dtype": "uint8", "shape": ["batch", 32, 32, 3]}


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_dynamic_batch_gives_the_same_per_image_embeddings(batch, exports):
    path, _ = exports("resnet18-small", RANDOM_CASES["resnet18-small"][0])
    sess = session(path)
    pool = images(32, 32, seed=5)
    full = sess.run([OUTPUT], {INPUT_UINT8: pool})[0]
    part = sess.run([OUTPUT], {INPUT_UINT8: pool[:batch]})[0]
    assert part.shape == (batch, 512)
    np.testing.assert_allclose(part, full[:batch], rtol=0, atol=1e-5)


def test_float_input_takes_normalised_nchw(exports):
    source, size = RANDOM_CASES["resnet18-small"]
    fpath, freport = exports("resnet18-small-float", source, input_kind="float")
    upath, _ = exports("resnet18-small", source)
    assert freport["verification"]["max_abs_diff"] <= 1e-4
    meta = xo.read_metadata(fpath)
    assert meta["input"] == "float" and meta["input_name"] == INPUT_FLOAT
    (inp,) = onnx.load(str(fpath)).graph.input
    assert inp.name == INPUT_FLOAT and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = images(6, size, seed=2)
    pre = meta["preprocessing"]
    from_float = session(fpath).run([OUTPUT], {INPUT_FLOAT: pre.normalize(batch)})[0]
    from_uint8 = session(upath).run([OUTPUT], {INPUT_UINT8: batch})[0]
    np.testing.assert_allclose(from_float, from_uint8, rtol=0, atol=1e-5)  # the in-graph normalisation


def test_float16_halves_the_file_within_tolerance(exports):
    source, size = RANDOM_CASES["resnet18-small"]
    hpath, hreport = exports("resnet18-small-fp16", source, fp16=True)
    _, freport = exports("resnet18-small", source)
    assert hreport["verification"]["passed"] and hreport["verification"]["min_cosine"] >= 0.999
    assert hreport["verification"]["tolerance"] == {"min_cosine": 0.999}
    assert 0.45 < hreport["size_bytes"] / freport["size_bytes"] < 0.55
    model = onnx.load(str(hpath))
    kernels = [i for i in model.graph.initializer if i.name.startswith("encoder.") and len(i.dims) == 4]
    assert len(kernels) > 10 and all(w.data_type == onnx.TensorProto.FLOAT16 for w in kernels)
    mean_std = [i for i in model.graph.initializer if list(i.dims) == [1, 3, 1, 1]]
    assert mean_std and all(w.data_type == onnx.TensorProto.FLOAT for w in mean_std)  # normalisation in float32
    # the interface does not change: uint8 in, float32 out
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert xo.read_metadata(hpath)["weights"] == "float16"
    encoder, _, info = xo.load_source(source)
    batch = images(4, size, seed=9)
    got = session(hpath).run([OUTPUT], {INPUT_UINT8: batch})[0]
    assert got.dtype == np.float32 and cosines(got, torch_embed(encoder, info["preprocessing"], batch)).min() >= 0.999


def test_simplified_torchscript_export_gives_the_same_function(exports):
    """The non-default paths (legacy exporter, ONNX Runtime's offline basic optimisation), in one export."""
    source, size = "random:resnet18:small:16", 16
    base, _ = exports("r18-16", source)
    path, report = exports("r18-16-ts-simplified", source, exporter="torchscript", simplify=True)
    assert report["verification"]["passed"] and report["simplified"] and report["exporter"] == "torchscript"
    assert xo.read_metadata(path)["fingerprint"] == xo.read_metadata(base)["fingerprint"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Identity" not in ops and "BatchNormalization" not in ops
    batch = images(3, size, seed=4)
    np.testing.assert_allclose(session(path).run([OUTPUT], {INPUT_UINT8: batch})[0],
                               session(base).run([OUTPUT], {INPUT_UINT8: batch})[0], atol=1e-5)


# ============================================================================================
# Metadata
# ============================================================================================
def test_metadata_read_back(exports, run_dir):
    path, _ = exports("encoder-file", run_dir / "encoder.safetensors")
    meta = xo.read_metadata(path)
    assert set(METADATA_FIELDS) <= set(meta)
    _, info = load_encoder(run_dir / "encoder.safetensors")
    quick = preset("cpu-quick").model
    assert meta["arch"] == info["arch"] == quick.arch and meta["stem"] == quick.stem == "small"
    assert meta["embedding_dim"] == info["embedding_dim"] == build_encoder(quick.arch, quick.stem)[1]
    assert meta["head"] == "encoder" and meta["input"] == "uint8" and meta["weights"] == "float32"
    assert meta["preprocessing"] == info["preprocessing"]  # input size, resize size, mean, std
    assert meta["preprocessing"].input_size == 24
    assert meta["fingerprint"] == info["fingerprint"] and meta["byolkit_version"] == __version__
    assert meta["step"] == 7 and meta["opset"] == xo.DEFAULT_OPSET
    # the cheap reader agrees with onnx's own parser
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert decode_metadata(props[METADATA_KEY]) == meta == read_onnx_metadata(path)
    assert read_onnx_metadata_props(path) == props
    # ... and with ONNX Runtime's view of the file
    assert session(path).get_modelmeta().custom_metadata_map[METADATA_KEY] == props[METADATA_KEY]


def test_random_sources_are_seeded_and_fingerprinted():
    a, _, ia = xo.load_source("random:resnet18:small:16")
    b, _, ib = xo.load_source("random:resnet18:small:16")
    assert ia["fingerprint"] == ib["fingerprint"] == weights_fingerprint(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, _, ic = xo.load_source("random:resnet18:imagenet:16")
    assert ic["fingerprint"] != ia["fingerprint"]
    assert xo.parse_random_source("random:resnet50") == ("resnet50", "imagenet", 224)
    assert xo.parse_random_source("random:resnet18:small") == ("resnet18", "small", 32)


# ============================================================================================
# Sources: encoder file, run directory, full checkpoint, projector head
# ============================================================================================
def test_encoder_file_run_dir_and_checkpoint_are_the_same_encoder(exports, run_dir):
    path, _ = exports("encoder-file", run_dir / "encoder.safetensors")
    ckpt_path, ckpt_report = exports("checkpoint", run_dir / "checkpoint.pt")
    assert ckpt_report["verification"]["max_abs_diff"] <= 1e-4
    fingerprints = {xo.load_source(s)[2]["fingerprint"] for s in (run_dir, run_dir / "checkpoint.pt",
                                                                  run_dir / "encoder.safetensors")}
    assert len(fingerprints) == 1 and xo.read_metadata(ckpt_path)["fingerprint"] in fingerprints
    encoder, info = load_encoder(run_dir / "encoder.safetensors")  # the trainer's loader, not export's
    batch = images(4, 24, seed=6)
    expected = torch_embed(encoder, info["preprocessing"], batch)
    for p in (path, ckpt_path):
        got = session(p).run([OUTPUT], {INPUT_UINT8: batch})[0]
        assert np.abs(got - expected).max() <= 1e-4


def test_projector_head_from_the_full_checkpoint(exports, run_dir):
    path, report = exports("projector", run_dir, head="projector")  # a run dir: its checkpoint.pt
    assert report["verification"]["passed"]
    meta = xo.read_metadata(path)
    assert meta["head"] == "projector" and meta["embedding_dim"] == PROJ_DIM
    _, info = load_encoder(run_dir / "encoder.safetensors")
    assert meta["encoder_fingerprint"] == info["fingerprint"] != meta["fingerprint"]
    # the reference: the checkpoint's online projector, loaded here by hand
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    encoder, dim = build_encoder(info["arch"], info["stem"])
    model = BYOL(encoder, dim, PROJ_HIDDEN, PROJ_DIM, 16)
    model.load_state_dict(state)
    model.eval()
    batch = images(4, 24, seed=8)
    expected = torch_embed(model.encoder, info["preprocessing"], batch, projector=model.projector)
    got = session(path).run([OUTPUT], {INPUT_UINT8: batch})[0]
    assert got.shape == (4, PROJ_DIM) and np.abs(got - expected).max() <= 1e-4


def test_projector_head_needs_the_full_checkpoint(run_dir, tmp_path):
    with pytest.raises(xo.ExportError, match="needs the full training checkpoint"):
        xo.export_onnx(run_dir / "encoder.safetensors", tmp_path / "p.onnx", head="projector")
    only_encoder = tmp_path / "only-encoder"
    only_encoder.mkdir()
    (only_encoder / "encoder.safetensors").write_bytes((run_dir / "encoder.safetensors").read_bytes())
    with pytest.raises(xo.ExportError, match="needs the full training checkpoint"):
        xo.export_onnx(only_encoder, tmp_path / "p.onnx", head="projector")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only-encoder"]


# ============================================================================================
# Bad input: clear messages, exit status 2, nothing written
# ============================================================================================
@pytest.fixture(scope="module")
def bad_sources(run_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    enc = (run_dir / "encoder.safetensors").read_bytes()
    ckpt = (run_dir / "checkpoint.pt").read_bytes()
    (root / "truncated.safetensors").write_bytes(enc[: len(enc) // 2])
    (root / "truncated.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (root / "photo.safetensors").write_bytes(image_bytes(make_image((10, 20, 30), 0), "PNG"))
    (root / "notes.pt").write_text("not a checkpoint\n" * 10)
    torch.save({"weights": torch.zeros(3)}, root / "other.pt")  # a torch file, not byolkit's
    # metadata that names another architecture than the weights
    encoder, dim = build_encoder("resnet18", "small")
    save_encoder(root / "mislabelled.safetensors", encoder, arch="resnet34", stem="small", embedding_dim=dim,
                 preprocessing=Preprocessing.for_image_size(32))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"]["model"]["arch"] = "resnet50"
    torch.save(state, root / "mislabelled.pt")
    return {
        "missing": (root / "nope" / "encoder.safetensors", "no encoder or checkpoint"),
        "empty-dir": (root, "holds neither"),
        "truncated-encoder": (root / "truncated.safetensors", "not a readable safetensors file"),
        "truncated-checkpoint": (root / "truncated.pt", "not a readable byolkit checkpoint"),
        "foreign-encoder": (root / "photo.safetensors", "not a readable safetensors file"),
        "foreign-checkpoint": (root / "notes.pt", "not a readable byolkit checkpoint"),
        "other-torch-file": (root / "other.pt", "not a byolkit checkpoint"),
        "arch-mismatch-encoder": (root / "mislabelled.safetensors", "do not match a resnet34"),
        "arch-mismatch-checkpoint": (root / "mislabelled.pt", "do not match a resnet50"),
        "unknown-arch": ("random:resnet19", "unknown architecture 'resnet19'"),
        "unknown-stem": ("random:resnet18:tiny", "unknown stem 'tiny'"),
    }


@pytest.mark.parametrize("case", ["missing", "empty-dir", "truncated-encoder", "truncated-checkpoint",
                                  "foreign-encoder", "foreign-checkpoint", "other-torch-file",
                                  "arch-mismatch-encoder", "arch-mismatch-checkpoint", "unknown-arch",
                                  "unknown-stem"])
def test_bad_sources_exit_2_with_one_line(case, bad_sources, tmp_path, capsys):
    source, message = bad_sources[case]
    out = tmp_path / "out" / "model.onnx"
    assert xo.main(["--checkpoint", str(source), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.parent.exists()  # nothing written, not even the folder


def test_existing_output_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"precious")
    assert xo.main(["--checkpoint", "random:resnet18:small:16", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert xo.main(["--checkpoint", "random:resnet18:small:16", "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_wrong_graph_fails_verification_exit_1_nothing_left(tmp_path, monkeypatch, capsys):
    """A graph that computes something else (here: normalised without std) must not pass."""
    def no_std(x, mean, std):
        return x - mean
    monkeypatch.setattr(xo, "normalize_unit_tensor", no_std)  # in the graph only; the reference uses numpy
    out = tmp_path / "new" / "folder" / "model.onnx"
    assert xo.main(["--checkpoint", "random:resnet18:small:16", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: verification failed, nothing written") and "does not match PyTorch" in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no model, no temporary file


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "plain-onnx"])
def test_read_metadata_rejects_what_is_not_a_byolkit_export(kind, exports, tmp_path):
    path = tmp_path / "x.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, this is not a model\n" * 20)
    elif kind == "truncated":
        good, _ = exports("r18-16", "random:resnet18:small:16")
        path.write_bytes(good.read_bytes()[:100_000])
    elif kind == "plain-onnx":
        node = onnx.helper.make_node("Relu", ["x"], ["y"])
        graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, [1])],
                                       [onnx.helper.make_tensor_value_info("y", 1, [1])])
        onnx.save(onnx.helper.make_model(graph), path)
    message = {"missing": "no ONNX file", "empty": "empty", "text": "not an ONNX model",
               "truncated": "truncated", "plain-onnx": "without byolkit metadata"}[kind]
    with pytest.raises(MetadataError, match=message):
        xo.read_metadata(path)


def test_other_bad_options(tmp_path):
    with pytest.raises(xo.ExportError, match="input must be one of"):
        xo.export_onnx("random:resnet18:small:16", tmp_path / "m.onnx", input_kind="rgb")
    with pytest.raises(xo.ExportError, match="opset must be between"):
        xo.export_onnx("random:resnet18:small:16", tmp_path / "m.onnx", opset=9)
    with pytest.raises(xo.ExportError, match="should end in .onnx"):
        xo.export_onnx("random:resnet18:small:16", tmp_path / "m.bin")
    with pytest.raises(CheckpointError):
        xo.load_source(tmp_path / "missing.pt")
    assert list(tmp_path.iterdir()) == []


# ============================================================================================
# The command line, as a user runs it
# ============================================================================================
def test_command_line_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--checkpoint", "random:resnet18:small:16",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["onnx"] == str(out) and report["verification"]["passed"]
    assert "wrote" in proc.stderr and "min cosine" in proc.stderr  # progress on stderr, the report on stdout
    assert xo.read_metadata(out)["arch"] == "resnet18"


def test_help_explains_sources_inputs_and_exit_codes():
    text = xo.get_args_parser().format_help()
    for needle in ("random:ARCH", "--fp16", "--input", "--head", "uint8 [N, H, W, 3]", "Exit status"):
        assert needle in text
