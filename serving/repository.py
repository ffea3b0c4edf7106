"""What the server serves: an exported encoder read from an ONNX file or an `export.triton` model
repository, written out as the model repository that the bundled tritonserver loads.

The served repository mirrors the exported one exactly: the model's name and version, its input
and output names, data types, dims and batch limit, and `platform: "onnxruntime_onnx"`, so that
model metadata and config read the same as from Triton's own onnxruntime backend (which the
nvidia-pytriton wheel does not bundle). The work is done by `serving/triton_model.py` on the
python backend. Next to it, `<name>_image` takes encoded image bytes (see IMAGE_INPUT).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from contract.deployment import DEFAULT_MODEL_NAME, INPUT_UINT8, OUTPUT, encode_metadata
from contract.preprocess import MAX_PIXELS

from .engine import MAX_IMAGE_BYTES, ModelError, OnnxEncoder

IMAGE_MODEL_SUFFIX = "_image"   # byol_encoder -> byol_encoder_image
IMAGE_INPUT = "image_bytes"     # BYTES [N, 1]: encoded images (JPEG, PNG, WebP, ...)
MODEL_FILE = "model.onnx"
TRITON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")


def image_model_name(name: str) -> str:
    return name + IMAGE_MODEL_SUFFIX


@dataclass
class ServedModel:
    """The tensor contract of one exported encoder, as Triton shows it to clients."""
    name: str
    version: int
    onnx_path: Path
    input_name: str
    input_type: str            # Triton data type name, e.g. TYPE_UINT8
    input_dims: list[int]      # without the batch dimension
    output_dims: list[int]
    max_batch_size: int
    info: dict = field(repr=False)  # byolkit metadata (contract.deployment)
    extra_parameters: dict = field(default_factory=dict, repr=False)  # copied from the exported config
    source_config: object = field(default=None, repr=False)  # the exported ModelConfig, if any


@dataclass
class ServingSettings:
    max_batch_size: int | None = None   # None: the exported repository's (64 for a bare ONNX file)
    dynamic_batching: bool = True
    max_queue_delay_us: int | None = None  # None: the exported repository's (2000 for a bare ONNX file)
    instances: int = 1
    device: str = "auto"
    threads: int = 0
    max_pixels: int = MAX_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_queue_size: int = 64  # requests waiting per model; more are refused at once ("server busy")
    image_model: bool = True


DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 2000


def _check_encoder(path: Path) -> OnnxEncoder:
    return OnnxEncoder(path, device="cpu", threads=1)


def model_from_onnx(path: Path, name: str | None = None) -> ServedModel:
    enc = _check_encoder(path)
    return ServedModel(name=name or DEFAULT_MODEL_NAME, version=1, onnx_path=path.resolve(),
                       input_name=enc.input_name,
                       input_type="TYPE_UINT8" if enc.input_name == INPUT_UINT8 else "TYPE_FP32",
                       input_dims=list(enc.item_shape), output_dims=[enc.embedding_dim],
                       max_batch_size=DEFAULT_MAX_BATCH_SIZE, info=enc.info)


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ModelError(f"{path} is not a valid Triton model config: {e}") from None


def model_from_repository(repo: Path, name: str | None = None) -> ServedModel:
    """An `export.triton` repository: REPO/NAME/config.pbtxt and REPO/NAME/<version>/model.onnx."""
    names = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    if not names:
        raise ModelError(f"{repo} is a directory but no model repository (no */config.pbtxt)")
    if name is None:
        name = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in names else names[0] if len(names) == 1 else None
        if name is None:
            raise ModelError(f"{repo} holds several models ({', '.join(names)}); choose one with --model-name")
    elif name not in names:
        raise ModelError(f"{repo} has no model {name!r} (it has {', '.join(names)})")
    from tritonclient.grpc import model_config_pb2
    config = _parse_config(repo / name / "config.pbtxt")
    versions = sorted(int(p.name) for p in (repo / name).iterdir()
                      if p.name.isdigit() and (p / MODEL_FILE).is_file())
    if not versions:
        raise ModelError(f"{repo / name} has no version directory with {MODEL_FILE}")
    version = versions[-1]  # Triton's default version policy: the latest
    onnx_path = repo / name / str(version) / MODEL_FILE
    enc = _check_encoder(onnx_path)
    if len(config.input) != 1 or len(config.output) != 1:
        raise ModelError(f"{repo / name}/config.pbtxt: expected one input and one output")
    inp, out = config.input[0], config.output[0]
    dtype = model_config_pb2.DataType.Name(inp.data_type)
    expected = (enc.input_name, "TYPE_UINT8" if enc.input_name == INPUT_UINT8 else "TYPE_FP32",
                list(enc.item_shape), OUTPUT, [enc.embedding_dim])
    found = (inp.name, dtype, list(inp.dims), out.name, list(out.dims))
    if found != expected:
        raise ModelError(f"{repo / name}/config.pbtxt does not match its {MODEL_FILE}: config has "
                         f"{found}, the ONNX graph {expected}")
    if config.max_batch_size <= 0:
        raise ModelError(f"{repo / name}/config.pbtxt: max_batch_size must be positive (a batched encoder)")
    extra = {k: v.string_value for k, v in config.parameters.items()}
    return ServedModel(name=name, version=version, onnx_path=onnx_path.resolve(), input_name=inp.name,
                       input_type=dtype, input_dims=list(inp.dims), output_dims=list(out.dims),
                       max_batch_size=config.max_batch_size, info=enc.info, extra_parameters=extra,
                       source_config=config)


def load_model(source, name: str | None = None) -> ServedModel:
    """An ONNX file or an `export.triton` model repository -> ServedModel. Raises ModelError."""
    path = Path(source)
    if path.is_dir():
        return model_from_repository(path, name)
    if not path.exists():
        raise ModelError(f"no such file or directory: {path}")
    return model_from_onnx(path, name)


def _config(model: ServedModel, settings: ServingSettings, kind: str):
    from tritonclient.grpc import model_config_pb2 as pb

    max_batch = settings.max_batch_size or model.max_batch_size
    src = model.source_config
    c = pb.ModelConfig(name=model.name if kind == "tensor" else image_model_name(model.name),
                       platform="onnxruntime_onnx", backend="python", max_batch_size=max_batch)
    if kind == "tensor":
        c.input.add(name=model.input_name, data_type=pb.DataType.Value(model.input_type), dims=model.input_dims)
    else:
        c.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    c.output.add(name=OUTPUT, data_type=pb.TYPE_FP32, dims=model.output_dims)
    if settings.dynamic_batching:  # the exported repository's batching, within this server's settings
        if src is not None and src.HasField("dynamic_batching"):
            c.dynamic_batching.CopyFrom(src.dynamic_batching)
            sizes = sorted({min(b, max_batch) for b in src.dynamic_batching.preferred_batch_size})
            del c.dynamic_batching.preferred_batch_size[:]
            c.dynamic_batching.preferred_batch_size.extend(sizes)
        if settings.max_queue_delay_us is not None:
            c.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
        elif src is None or not src.HasField("dynamic_batching"):
            c.dynamic_batching.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
        # a bounded queue: beyond it Triton refuses at once (UNAVAILABLE) instead of holding the request
        c.dynamic_batching.default_queue_policy.max_queue_size = settings.max_queue_size
    if kind == "tensor" and src is not None:  # its warm-up requests too (random pixels; not for bytes)
        for w in src.model_warmup:
            c.model_warmup.add().CopyFrom(w)
            c.model_warmup[-1].batch_size = min(w.batch_size, max_batch)
    c.instance_group.add(count=settings.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    params = dict(model.extra_parameters)
    params.update(byolkit=encode_metadata(model.info), byolkit_kind=kind, device=settings.device,
                  threads=str(settings.threads), max_pixels=str(settings.max_pixels),
                  max_image_bytes=str(settings.max_image_bytes))
    for k, v in params.items():
        c.parameters[k].string_value = v
    return c


def write_repository(model: ServedModel, settings: ServingSettings, root: Path) -> list[str]:
    """Write the served model repository under `root` -> the model names in it."""
    from google.protobuf import text_format

    names = []
    for kind in ("tensor", "image") if settings.image_model else ("tensor",):
        config = _config(model, settings, kind)
        version_dir = root / config.name / str(model.version)
        version_dir.mkdir(parents=True)
        (root / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copyfile(TRITON_MODEL_SOURCE, version_dir / "model.py")
        (version_dir / MODEL_FILE).symlink_to(model.onnx_path)
        names.append(config.name)
    return names


def describe(model: ServedModel) -> str:
    info = model.info
    return (f"{info['arch']} ({info['stem']} stem), {model.input_name} {model.input_type[5:].lower()} "
            f"{model.input_dims} -> {OUTPUT} [{model.output_dims[0]}], fingerprint {info['fingerprint']}")


def metadata_json(model: ServedModel) -> str:
    return json.dumps({"name": model.name, "version": model.version, **{k: v for k, v in model.info.items()
                                                                        if k != "preprocessing"}})
