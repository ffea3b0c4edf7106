"""Put an exported ONNX encoder into a Triton Inference Server model repository.

    python -m export.triton --onnx model.onnx --repository REPO [--name byol_encoder] \\
        [--max-batch-size 32] [--kind cpu|gpu] [--tensorrt]

writes

    REPO/NAME/config.pbtxt        the model configuration for Triton's onnxruntime backend
    REPO/NAME/<version>/model.onnx

The configuration is built as Triton's own ModelConfig protobuf (tritonclient's model_config_pb2)
and its inputs and outputs are read from the ONNX graph: names, types and per-item shapes
(the batch axis is Triton's, up to max_batch_size). It sets dynamic batching (preferred batch
sizes and a queue delay), instance groups on the CPU or the GPUs, optional TensorRT acceleration
(FP16, engine and timing caches, an optimisation profile covering batch 1 to max_batch_size), a
warm-up at batch 1 and at max_batch_size. The byolkit metadata (preprocessing, embedding size,
fingerprint) stays in each version's model.onnx, and the configuration carries the served
version's copy as the parameter "byolkit" (Triton serves only the latest version), so that a
client of a stock Triton server learns the preprocessing and the model's fingerprint from the
model configuration, exactly as from serving.server.

Each call adds a new version folder (the next number, or --version); an existing version is never
replaced. config.pbtxt is shared by all versions: a new version must have the same inputs and
outputs, and a configuration that differs from the existing one in anything but the "byolkit"
parameter is only replaced with --replace-config (a newer version updates that parameter). Writes go to a
temporary folder first, so that Triton never sees half a version.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from contract.deployment import DEFAULT_MODEL_NAME, METADATA_KEY, MetadataError, read_onnx_metadata

KINDS = ("cpu", "gpu")
MODEL_FILENAME = "model.onnx"
CONFIG_NAME = "config.pbtxt"
DEFAULT_MAX_BATCH_SIZE = 32
# The queue delay is a small share of one batch's compute: ResNet-18 needs ~0.2 s for 8 images on two
# CPU cores, ResNet-50 a few ms for 32 on a GPU.
DEFAULT_QUEUE_DELAY_US = {"cpu": 2000, "gpu": 200}
# ONNX Runtime's TensorRT provider creates its cache folder with a plain mkdir, not recursively:
# the cache is one folder, byolkit_trt_cache_NAME, inside a folder that exists on the server
# (/tmp always does). A deeper default path made Triton fail to load the model.
DEFAULT_TRT_CACHE_DIR = "/tmp"
MAX_WORKSPACE_BYTES = 1 << 30
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# ONNX TensorProto element types -> Triton data types
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


class RepositoryError(ValueError):
    """Bad input to the repository writer: one `error:` line, exit status 2, nothing written."""


# ============================================================================================
# Reading the ONNX file's interface
# ============================================================================================
def onnx_signature(onnx_path) -> dict:
    """{"inputs"/"outputs": [(name, triton type, dims including the batch axis as -1)]} of a checked
    ONNX file, plus its byolkit metadata (raw JSON-able form) as "metadata"."""
    import onnx

    path = Path(onnx_path)
    meta = read_onnx_metadata(path)  # MetadataError for missing, truncated, foreign files
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - protobuf and checker errors alike
        raise RepositoryError(f"{path} is not a valid ONNX model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _ONNX_TO_TRITON:
                raise RepositoryError(f"{path}: tensor {v.name} has an ONNX type ({t.elem_type}) Triton cannot serve")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, _ONNX_TO_TRITON[t.elem_type], dims))
        return out

    initializers = {i.name for i in model.graph.initializer}
    sig = {"inputs": tensors([i for i in model.graph.input if i.name not in initializers]),
           "outputs": tensors(model.graph.output)}
    raw = dict(meta)
    raw["preprocessing"] = meta["preprocessing"].to_dict()
    sig["metadata"] = raw
    for name, _, dims in sig["inputs"] + sig["outputs"]:
        if not dims or dims[0] != -1 or -1 in dims[1:]:
            raise RepositoryError(f"{path}: tensor {name} has shape {dims}; Triton batching needs a dynamic first "
                                  f"(batch) axis and fixed others (export it with export.onnx)")
    return sig


# ============================================================================================
# The configuration
# ============================================================================================
def default_preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """A quarter, half and all of max_batch_size (the sizes worth waiting for), at least 1 each."""
    return sorted({max(1, max_batch_size // 4), max(1, max_batch_size // 2), max_batch_size})


def trt_cache_path(cache_dir: str, name: str) -> str:
    """The TensorRT engine and timing cache of model `name`: one level below `cache_dir`."""
    return f"{cache_dir.rstrip('/')}/byolkit_trt_cache_{name}"


def build_config(onnx_path, *, name: str = DEFAULT_MODEL_NAME, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 kind: str = "cpu", instance_count: int = 1, gpus: list[int] | None = None,
                 preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int | None = None,
                 tensorrt: bool = False, tensorrt_precision: str = "FP16", trt_cache_dir: str = DEFAULT_TRT_CACHE_DIR,
                 warmup: bool = True):
    """-> (model_config_pb2.ModelConfig, signature) for an ONNX file made by export.onnx."""
    from tritonclient.grpc import model_config_pb2 as mc

    if not NAME_PATTERN.match(name or ""):
        raise RepositoryError(f"model name {name!r} must be letters, digits, '_', '.', '-' (not starting with . or -)")
    if kind not in KINDS:
        raise RepositoryError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 1 <= max_batch_size <= 65536:
        raise RepositoryError(f"max batch size must be between 1 and 65536, got {max_batch_size}")
    if instance_count < 1:
        raise RepositoryError(f"instance count must be at least 1, got {instance_count}")
    if tensorrt and kind != "gpu":
        raise RepositoryError("TensorRT runs on GPUs: --tensorrt needs --kind gpu")
    if tensorrt_precision.upper() not in ("FP16", "FP32"):
        raise RepositoryError(f"TensorRT precision must be FP16 or FP32, got {tensorrt_precision!r}")
    preferred = sorted(set(preferred_batch_sizes or default_preferred_batch_sizes(max_batch_size)))
    if preferred[0] < 1 or preferred[-1] > max_batch_size:
        raise RepositoryError(f"preferred batch sizes {preferred} must lie between 1 and the max batch size "
                              f"{max_batch_size}")
    delay = DEFAULT_QUEUE_DELAY_US[kind] if max_queue_delay_us is None else int(max_queue_delay_us)
    if delay < 0:
        raise RepositoryError(f"queue delay must be >= 0 microseconds, got {delay}")

    sig = onnx_signature(onnx_path)
    if tensorrt and sig["metadata"].get("weights") == "int8":
        raise RepositoryError(f"{onnx_path} is an int8 model for CPUs (QDQ, uint8 activations); TensorRT takes "
                              "symmetric int8 only: serve the float32 export with --tensorrt")
    if len(sig["inputs"]) != 1 or len(sig["outputs"]) != 1:
        raise RepositoryError(f"{onnx_path}: expected one input and one output, found "
                              f"{len(sig['inputs'])} and {len(sig['outputs'])}")
    cfg = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size,
                         default_model_filename=MODEL_FILENAME)
    cfg.version_policy.latest.num_versions = 1
    cfg.parameters[METADATA_KEY].string_value = json.dumps(sig["metadata"], sort_keys=True)
    for (tname, dtype, dims) in sig["inputs"]:
        cfg.input.add(name=tname, data_type=mc.DataType.Value(dtype), dims=dims[1:])
    for (tname, dtype, dims) in sig["outputs"]:
        cfg.output.add(name=tname, data_type=mc.DataType.Value(dtype), dims=dims[1:])

    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = delay
    group = cfg.instance_group.add(count=instance_count, kind=mc.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}"))
    if kind == "gpu" and gpus:
        group.gpus.extend(gpus)

    if tensorrt:
        in_name, _, in_dims = sig["inputs"][0]
        item = "x".join(str(d) for d in in_dims[1:])
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt_cache = trt_cache_path(trt_cache_dir, name)
        for key, value in (("precision_mode", tensorrt_precision.upper()),
                           ("max_workspace_size_bytes", str(MAX_WORKSPACE_BYTES)),
                           ("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", trt_cache),
                           ("trt_timing_cache_enable", "1"), ("trt_timing_cache_path", trt_cache),
                           # one optimisation profile for every batch the dynamic batcher can form
                           ("trt_profile_min_shapes", f"{in_name}:1x{item}"),
                           ("trt_profile_opt_shapes", f"{in_name}:{preferred[-1]}x{item}"),
                           ("trt_profile_max_shapes", f"{in_name}:{max_batch_size}x{item}")):
            trt.parameters[key] = value

    if warmup:
        for batch in sorted({1, max_batch_size}):
            w = cfg.model_warmup.add(name=f"random_batch_{batch}", batch_size=batch)
            for (tname, dtype, dims) in sig["inputs"]:
                w.inputs[tname].data_type = mc.DataType.Value(dtype)
                w.inputs[tname].dims.extend(dims[1:])
                w.inputs[tname].random_data = True
    return cfg, sig


def config_text(cfg) -> str:
    from google.protobuf import text_format
    return text_format.MessageToString(cfg)


def read_config(path):
    """config.pbtxt -> model_config_pb2.ModelConfig (RepositoryError when it does not parse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise RepositoryError(f"{path} is not a readable Triton model configuration ({e})") from None


def _settings_text(cfg) -> str:
    """The configuration without the served version's metadata: what --replace-config guards."""
    from tritonclient.grpc import model_config_pb2 as mc
    copy = mc.ModelConfig()
    copy.CopyFrom(cfg)
    copy.parameters.pop(METADATA_KEY, None)
    return config_text(copy)


def _io(cfg) -> list:
    return [(t.name, t.data_type, list(t.dims)) for t in (*cfg.input, *cfg.output)]


def check_config(cfg, onnx_path) -> None:
    """Raise RepositoryError unless `cfg`'s inputs and outputs are the ONNX file's (names, types, shapes)."""
    from tritonclient.grpc import model_config_pb2 as mc
    sig = onnx_signature(onnx_path)
    expected = [(n, mc.DataType.Value(t), d[1:]) for n, t, d in sig["inputs"] + sig["outputs"]]
    if _io(cfg) != expected:
        raise RepositoryError(f"the configuration's tensors {_io(cfg)} are not {onnx_path}'s {expected}")
    if cfg.max_batch_size < 1:
        raise RepositoryError("max_batch_size must be >= 1 for the batched ONNX export")


# ============================================================================================
# The repository
# ============================================================================================
def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_repository(onnx_path, repository, *, name: str = DEFAULT_MODEL_NAME,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, kind: str = "cpu", version: int | None = None,
                     replace_config: bool = False, quiet: bool = True, **config_options) -> Path:
    """Add `onnx_path` as a new version of model `name` in `repository`; returns the version folder.

    config_options go to build_config (instance_count, gpus, preferred_batch_sizes, max_queue_delay_us,
    tensorrt, tensorrt_precision, trt_cache_dir, warmup). Raises RepositoryError / MetadataError.
    """
    from trainer.checkpoint import atomic_write

    repo = Path(repository)
    onnx_path = Path(onnx_path)
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"{repo} exists and is not a directory")
    cfg, _ = build_config(onnx_path, name=name, max_batch_size=max_batch_size, kind=kind, **config_options)
    text = config_text(cfg)
    model_dir = repo / name
    if model_dir.exists() and not model_dir.is_dir():
        raise RepositoryError(f"{model_dir} exists and is not a directory")
    config_path = model_dir / CONFIG_NAME
    existing = _versions(model_dir) if model_dir.is_dir() else []
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    if version < 1:
        raise RepositoryError(f"version must be >= 1, got {version}")
    write_config = True
    if config_path.exists():
        old = read_config(config_path)
        if _io(old) != _io(cfg):
            raise RepositoryError(f"{model_dir} serves other tensors ({_io(old)}) than {onnx_path} ({_io(cfg)}); "
                                  f"all versions of a Triton model share one configuration: choose another --name")
        if _settings_text(old) != _settings_text(cfg) and not replace_config:
            raise RepositoryError(f"{config_path} exists with other settings; pass --replace-config to replace it "
                                  f"(it applies to every version of {name})")
        if existing and version < existing[-1] and METADATA_KEY in old.parameters:
            # Triton keeps serving the newest version: the metadata must stay that version's
            cfg.parameters[METADATA_KEY].string_value = old.parameters[METADATA_KEY].string_value
            text = config_text(cfg)
        write_config = config_path.read_text() != text
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise RepositoryError(f"{version_dir} already exists; versions are never overwritten (omit --version for "
                              f"the next one, {(existing[-1] + 1) if existing else 1})")

    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}.", suffix=".tmp", dir=model_dir))  # not numeric: ignored
    try:
        shutil.copyfile(onnx_path, staging / MODEL_FILENAME)
        _fsync_file(staging / MODEL_FILENAME)
        if write_config:  # inputs and outputs are unchanged, so old versions and the new one both fit it
            atomic_write(config_path, lambda tmp: Path(tmp).write_text(text))
        os.rename(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    if not quiet:
        print(f"wrote {version_dir / MODEL_FILENAME}" + (f" and {config_path}" if write_config else
                                                          f" ({config_path} unchanged)"), file=sys.stderr)
    return version_dir


# ============================================================================================
# Command line
# ============================================================================================
def _batch_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.triton", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add an ONNX encoder exported by `python -m export.onnx` to a Triton model repository "
                    "(onnxruntime backend): REPO/NAME/config.pbtxt and REPO/NAME/<version>/model.onnx.",
        epilog="Every call adds the next version; existing versions are never replaced. The configuration is\n"
               "shared by all versions: changing its settings needs --replace-config, changing the model's\n"
               "inputs or outputs needs another --name.\n\n"
               "Serve it:  tritonserver --model-repository REPO\n"
               "Exit status: 0 done, 2 bad input (nothing written).")
    p.add_argument("--onnx", required=True, metavar="MODEL.onnx", help="a file written by python -m export.onnx")
    p.add_argument("--repository", required=True, metavar="REPO", help="model repository folder (created if needed)")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help=f"model name (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"largest batch Triton forms or accepts (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--kind", choices=KINDS, default="cpu", help="run the instances on the CPU (default) or GPUs")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU with --kind gpu; default 1)")
    p.add_argument("--gpus", type=_batch_list, default=None, metavar="0,1", help="GPU ids for --kind gpu (default all)")
    p.add_argument("--preferred-batch-sizes", type=_batch_list, default=None, metavar="8,16,32",
                   help="dynamic batching's preferred sizes (default: a quarter, half and all of the max)")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="how long the dynamic batcher waits to fill a batch (default "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_QUEUE_DELAY_US.items()) + " microseconds)")
    p.add_argument("--tensorrt", action="store_true",
                   help="TensorRT execution accelerator (GPU), with engine and timing caches")
    p.add_argument("--trt-precision", choices=("fp16", "fp32"), default="fp16",
                   help="TensorRT precision (default fp16)")
    p.add_argument("--trt-cache-dir", default=DEFAULT_TRT_CACHE_DIR,
                   help="an existing folder on the server that receives the TensorRT engine cache, "
                        f"byolkit_trt_cache_NAME (default {DEFAULT_TRT_CACHE_DIR})")
    p.add_argument("--no-warmup", action="store_true", help="no warm-up requests when Triton loads the model")
    p.add_argument("--version", type=int, default=None, help="version number (default: the next one)")
    p.add_argument("--replace-config", action="store_true", help="replace an existing config.pbtxt with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        version_dir = write_repository(
            args.onnx, args.repository, name=args.name, max_batch_size=args.max_batch_size, kind=args.kind,
            version=args.version, replace_config=args.replace_config, quiet=args.quiet,
            instance_count=args.instances, gpus=args.gpus, preferred_batch_sizes=args.preferred_batch_sizes,
            max_queue_delay_us=args.max_queue_delay_us, tensorrt=args.tensorrt,
            tensorrt_precision=args.trt_precision.upper(), trt_cache_dir=args.trt_cache_dir,
            warmup=not args.no_warmup)
    except (RepositoryError, MetadataError, ValueError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.name, "version": int(version_dir.name), "version_dir": str(version_dir),
                      "config": str(version_dir.parent / CONFIG_NAME)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
