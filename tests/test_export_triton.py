"""export.triton: repository layout, config.pbtxt parsed with Triton's own protobuf and checked against
the ONNX file, versioning without overwrites, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import export.onnx as xo
import export.triton as xt
from contract.deployment import DEFAULT_MODEL_NAME, INPUT_FLOAT, INPUT_UINT8, OUTPUT

SOURCE = "random:resnet18:small:16"


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for kind in ("uint8", "float"):
        files[kind] = root / f"{kind}.onnx"
        xo.export_onnx(SOURCE, files[kind], input_kind=kind)
    return files


def parse(path: Path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def onnx_io(path: Path) -> list:
    """(name, ONNX element type, dims) of the graph's inputs and outputs, read with onnx itself."""
    g = onnx.load(str(path)).graph
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value or -1 for d in v.type.tensor_type.shape.dim])
            for v in (*g.input, *g.output)]


TRITON_TYPE = {onnx.TensorProto.UINT8: mc.TYPE_UINT8, onnx.TensorProto.FLOAT: mc.TYPE_FP32}


def test_repository_layout_and_config(onnx_files, tmp_path):
    repo = tmp_path / "repo"
    version_dir = xt.write_repository(onnx_files["uint8"], repo, max_batch_size=16)
    assert version_dir == repo / DEFAULT_MODEL_NAME / "1"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        DEFAULT_MODEL_NAME, f"{DEFAULT_MODEL_NAME}/1", f"{DEFAULT_MODEL_NAME}/1/model.onnx",
        f"{DEFAULT_MODEL_NAME}/config.pbtxt"]
    assert (version_dir / "model.onnx").read_bytes() == onnx_files["uint8"].read_bytes()
    cfg = parse(repo / DEFAULT_MODEL_NAME / "config.pbtxt")
    assert cfg.name == DEFAULT_MODEL_NAME and cfg.backend == "onnxruntime" and cfg.max_batch_size == 16
    assert cfg.default_model_filename == "model.onnx"
    # the tensors are the ONNX file's: names, types, shapes without the batch axis
    config_io = [(t.name, t.data_type, [-1, *t.dims]) for t in (*cfg.input, *cfg.output)]
    assert config_io == [(n, TRITON_TYPE[t], d) for n, t, d in onnx_io(onnx_files["uint8"])]
    assert config_io == [(INPUT_UINT8, mc.TYPE_UINT8, [-1, 16, 16, 3]), (OUTPUT, mc.TYPE_FP32, [-1, 512])]
    xt.check_config(cfg, onnx_files["uint8"])
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == xt.DEFAULT_QUEUE_DELAY_US["cpu"]
    (group,) = cfg.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 1
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(w.batch_size, dict(w.inputs)[INPUT_UINT8].random_data, list(dict(w.inputs)[INPUT_UINT8].dims))
            for w in cfg.model_warmup] == [(1, True, [16, 16, 3]), (16, True, [16, 16, 3])]


def test_float_input_model(onnx_files, tmp_path):
    version_dir = xt.write_repository(onnx_files["float"], tmp_path, name="byol_float", max_batch_size=8,
                                      warmup=False)
    cfg = parse(version_dir.parent / "config.pbtxt")
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [(INPUT_FLOAT, mc.TYPE_FP32, [3, 16, 16])]
    assert not cfg.model_warmup
    xt.check_config(cfg, onnx_files["float"])
    with pytest.raises(xt.RepositoryError, match="not"):
        xt.check_config(cfg, onnx_files["uint8"])  # the check does tell the two apart


def test_gpu_with_tensorrt(onnx_files, tmp_path):
    version_dir = xt.write_repository(onnx_files["uint8"], tmp_path, kind="gpu", max_batch_size=64, tensorrt=True,
                                      instance_count=2, gpus=[0, 1], preferred_batch_sizes=[16, 64],
                                      max_queue_delay_us=100)
    cfg = parse(version_dir.parent / "config.pbtxt")
    (group,) = cfg.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 64]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(trt.parameters)
    assert trt.name == "tensorrt" and params["precision_mode"] == "FP16"
    assert params["trt_engine_cache_enable"] == "1" and params["trt_engine_cache_path"].endswith(DEFAULT_MODEL_NAME)
    assert params["trt_profile_min_shapes"] == f"{INPUT_UINT8}:1x16x16x3"
    assert params["trt_profile_max_shapes"] == f"{INPUT_UINT8}:64x16x16x3"


def test_tensorrt_cache_folder_is_one_mkdir_away(onnx_files, tmp_path):
    """ONNX Runtime's TensorRT provider makes its cache folder with a plain (non-recursive) mkdir:
    the configured path must sit directly in a folder that exists on the server, else Triton fails
    to load the model. The default sits in /tmp; a chosen folder gets its cache folder one level down."""
    import os
    cfg, _ = xt.build_config(onnx_files["uint8"], kind="gpu", tensorrt=True)
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    default = dict(trt.parameters)["trt_engine_cache_path"]
    assert os.path.dirname(default) == "/tmp" and DEFAULT_MODEL_NAME in os.path.basename(default)

    server_dir = tmp_path / "server-cache"  # a fresh folder, as on a new server
    server_dir.mkdir()
    cfg, _ = xt.build_config(onnx_files["uint8"], kind="gpu", tensorrt=True, trt_cache_dir=f"{server_dir}/")
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(trt.parameters)
    os.mkdir(params["trt_engine_cache_path"])  # what the provider does: succeeds, no parent to create
    assert params["trt_timing_cache_path"] == params["trt_engine_cache_path"]
    assert Path(params["trt_engine_cache_path"]).parent == server_dir


def test_new_versions_never_overwrite(onnx_files, tmp_path):
    model_dir = tmp_path / DEFAULT_MODEL_NAME
    assert xt.write_repository(onnx_files["uint8"], tmp_path).name == "1"
    config = (model_dir / "config.pbtxt").read_text()
    assert xt.write_repository(onnx_files["uint8"], tmp_path).name == "2"  # same settings: config untouched
    assert (model_dir / "config.pbtxt").read_text() == config
    (model_dir / "1" / "model.onnx").write_bytes(b"marker")
    with pytest.raises(xt.RepositoryError, match="never overwritten"):
        xt.write_repository(onnx_files["uint8"], tmp_path, version=1)
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"marker"
    with pytest.raises(xt.RepositoryError, match="--replace-config"):
        xt.write_repository(onnx_files["uint8"], tmp_path, max_batch_size=8)
    assert (model_dir / "config.pbtxt").read_text() == config
    assert xt.write_repository(onnx_files["uint8"], tmp_path, max_batch_size=8, replace_config=True).name == "3"
    assert parse(model_dir / "config.pbtxt").max_batch_size == 8
    assert xt.write_repository(onnx_files["uint8"], tmp_path, version=10, max_batch_size=8).name == "10"
    with pytest.raises(xt.RepositoryError, match="other tensors"):  # other inputs: never under the same name
        xt.write_repository(onnx_files["float"], tmp_path, max_batch_size=8, replace_config=True)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "10", "2", "3", "config.pbtxt"]  # no leftovers


@pytest.fixture(scope="module")
def bad_onnx(onnx_files, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-onnx")
    good = onnx_files["uint8"].read_bytes()
    (root / "truncated.onnx").write_bytes(good[: len(good) // 3])
    (root / "text.onnx").write_text("definitely not a model\n" * 30)
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, ["n", 4])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["n", 4])])
    onnx.save(onnx.helper.make_model(graph), root / "foreign.onnx")
    return {"missing": (root / "nope.onnx", "no ONNX file"), "truncated": (root / "truncated.onnx", "truncated"),
            "text": (root / "text.onnx", "not an ONNX model"),
            "foreign": (root / "foreign.onnx", "without byolkit metadata")}


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "foreign"])
def test_bad_onnx_files_exit_2_and_write_nothing(case, bad_onnx, tmp_path, capsys):
    path, message = bad_onnx[case]
    repo = tmp_path / "repo"
    assert xt.main(["--onnx", str(path), "--repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not repo.exists()


@pytest.mark.parametrize("args, message", [
    (["--kind", "cpu", "--tensorrt"], "needs --kind gpu"),
    (["--name", "../escape"], "model name"),
    (["--max-batch-size", "0"], "max batch size"),
    (["--preferred-batch-sizes", "8,64"], "preferred batch sizes"),
])
def test_bad_options_exit_2_and_write_nothing(args, message, onnx_files, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert xt.main(["--onnx", str(onnx_files["uint8"]), "--repository", str(repo), *args]) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists()


def test_command_line_writes_a_version(onnx_files, tmp_path, capsys):
    assert xt.main(["--onnx", str(onnx_files["uint8"]), "--repository", str(tmp_path), "--name", "enc",
                    "--kind", "gpu", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 1 and Path(out["version_dir"]) == tmp_path / "enc" / "1"
    assert parse(tmp_path / "enc" / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    help_text = xt.get_args_parser().format_help()
    assert "--tensorrt" in help_text and "--replace-config" in help_text



def test_config_carries_the_served_versions_metadata(onnx_files, tmp_path_factory, tmp_path):
    """A stock Triton server answers model-config requests from config.pbtxt: the client and the
    app learn the preprocessing and the fingerprint from its "byolkit" parameter."""
    from contract.deployment import METADATA_KEY, decode_metadata
    other = tmp_path_factory.mktemp("other") / "other.onnx"
    xo.export_onnx("random:resnet18:imagenet:16", other, input_kind="uint8")  # same tensors, other network
    first, second = xo.read_metadata(onnx_files["uint8"]), xo.read_metadata(other)
    assert first["fingerprint"] != second["fingerprint"]

    def served(repo):
        return decode_metadata(parse(repo / DEFAULT_MODEL_NAME / "config.pbtxt").parameters[METADATA_KEY].string_value)

    xt.write_repository(onnx_files["uint8"], tmp_path)
    assert served(tmp_path)["fingerprint"] == first["fingerprint"]
    assert served(tmp_path)["preprocessing"] == first["preprocessing"]
    assert xt.write_repository(other, tmp_path).name == "2"  # only the metadata differs: no --replace-config
    assert served(tmp_path)["fingerprint"] == second["fingerprint"]
    assert served(tmp_path)["stem"] == "imagenet"
    xt.write_repository(onnx_files["uint8"], tmp_path, version=5)
    assert served(tmp_path)["fingerprint"] == first["fingerprint"]  # version 5 is now the served one
    xt.write_repository(other, tmp_path, version=3)  # an older version: the served metadata stays
    assert served(tmp_path)["fingerprint"] == first["fingerprint"]
