"""Export a BYOL encoder to ONNX, and prove that the file computes what PyTorch computes.

    python -m export.onnx --checkpoint runs/c10 --out model.onnx [--fp16] [--input uint8|float]
    python -m export.onnx --checkpoint runs/c10/checkpoint.pt --out proj.onnx --head projector
    python -m export.onnx --checkpoint random:resnet18:small:32 --out test.onnx

The graph (names from contract.deployment):
  uint8 input  "images"        [N, H, W, 3] RGB, decoded, resized and centre-cropped by the client
               (contract.preprocess steps 1-3); the graph scales to [0, 1], normalises with the
               encoder's own mean / std (contract.preprocess.normalize_unit_tensor) and goes to NCHW.
  float input  "pixel_values"  [N, 3, H, W] float32, already normalised (step 4 done by the client).
  output       "embeddings"    [N, D] float32: the pooled backbone feature (D = 512 for ResNet-18,
               2048 for ResNet-50), or with --head projector the online projector's output.
N is dynamic. The byolkit metadata (contract.deployment.METADATA_KEY) holds architecture, embedding
size, preprocessing (input size, resize size, mean, std), the weights' fingerprint and version.

Every export is verified before it is moved into place: the ONNX checker, then ONNX Runtime
against PyTorch eager (float32, unfused) on generated noise and picture-like images, at the full
batch and at batch 1. Tolerances: max |diff| <= 1e-4 and cosine >= 0.99999 for float32 weights,
cosine >= 0.999 for float16. A failed verification leaves no file behind.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contract.deployment import (
    INPUT_FLOAT,
    INPUT_UINT8,
    METADATA_KEY,
    OUTPUT,
    MetadataError,
    encode_metadata,
    read_onnx_metadata,
)
from contract.preprocess import (
    Preprocessing,
    normalize_unit_tensor,
)
from trainer import __version__
from trainer.checkpoint import (
    CHECKPOINT_NAME,
    ENCODER_NAME,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_encoder,
    weights_fingerprint,
)
from trainer.models import ARCHITECTURES, STEMS, MLPHead, build_encoder
from trainer.sources import RANDOM_PREFIX, resolve_random

from .quantize import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_HELD_BACK,
    DEFAULT_METHOD,
    DEFAULT_MIN_RECALL,
)

# Opset 18 (ONNX 1.13): run by ONNX Runtime >= 1.14 and TensorRT >= 8.6, so by every Triton release
# of the last years (23.x onwards), and the lowest opset torch's current (dynamo) exporter targets.
DEFAULT_OPSET = 18
INPUT_KINDS = ("uint8", "float")
HEADS = ("encoder", "projector")
EXPORTERS = ("dynamo", "torchscript")
BATCH_DIM = "batch"
RANDOM_SEED = 0

# Verification tolerances (issue 3): float32 weights must match PyTorch to these bounds.
FP32_MAX_ABS = 1e-4
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
VERIFY_RANDOM, VERIFY_PICTURES = 8, 8


class ExportError(ValueError):
    """Bad input to an export: reported as one `error:` line, exit status 2."""


class VerificationError(RuntimeError):
    """The exported graph does not compute what PyTorch computes: exit status 1, no file written."""


read_metadata = read_onnx_metadata  # (onnx_path) -> dict; cheap, see contract.deployment


# ============================================================================================
# Sources: run directory, checkpoint, encoder file, or random:ARCH[:STEM[:INPUT_SIZE]]
# ============================================================================================
def parse_random_source(spec: str) -> tuple[str, str, int]:
    """"random:resnet18:small:32" -> ("resnet18", "small", 32) (trainer.sources' grammar, random:PATH too)."""
    try:
        arch, stem, pre = resolve_random(spec)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return arch, stem, pre.input_size


def _random_encoder(spec: str, head: str):
    try:
        arch, stem, pre = resolve_random(spec)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    with torch.random.fork_rng(devices=[]):  # the projector draws after the encoder, from the same seed
        torch.manual_seed(RANDOM_SEED)
        encoder, dim = build_encoder(arch, stem)
        projector = MLPHead(dim) if head == "projector" else None
    calibrate_batchnorm(encoder, projector, pre)
    info = {"arch": arch, "stem": stem, "embedding_dim": dim, "step": 0, "preprocessing": pre,
            "fingerprint": weights_fingerprint(encoder.state_dict())}
    return encoder.eval(), (projector.eval() if projector is not None else None), info


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, projector: nn.Module | None, pre: Preprocessing, images: int = 16) -> None:
    """Scale each BatchNorm's running variance to its input on generated images; weights unchanged.

    At initialisation the running statistics are mean 0, variance 1, so in eval mode nothing is
    normalised and a random ResNet-50's features reach ~200, where float32 rounding alone (PyTorch's
    own, against float64) comes to 8e-5; a ResNet-152's reach 4e8, with a float32 error of 240. The
    verification's absolute 1e-4 could not hold. Trained encoders' features are of order 1. One
    forward pass in eval mode sets, layer after layer, each BatchNorm's variance to
    the mean square of its input (one scalar per layer: per-channel statistics would blow up the
    near-dead channels and make the network ill-conditioned), giving order-1 features whose float32
    error is ~1e-6 like a trained encoder's.
    """
    noise, pictures = verification_images(pre, images // 2, images - images // 2, seed=1)
    x = torch.from_numpy(pre.normalize(np.concatenate([noise, pictures])))

    def set_scale(bn, args):
        bn.running_mean.zero_()
        bn.running_var.fill_(max(float(args[0].double().pow(2).mean()), 1e-6))

    modules = [m.eval() for m in (encoder, projector) if m is not None]
    hooks = [bn.register_forward_pre_hook(set_scale) for m in modules for bn in m.modules()
             if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    try:
        y = encoder(x)
        if projector is not None:
            projector(y)
    finally:
        for h in hooks:
            h.remove()


def _projector_from_checkpoint(path: Path, dim: int) -> nn.Module:
    from trainer.config import Config
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    prefix = "projector."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    projector = MLPHead(dim, cfg.model.projector_hidden_dim, cfg.model.projection_dim)
    try:
        projector.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: projector weights do not match the checkpoint's configuration: "
                              f"{str(e).splitlines()[0]}") from None
    return projector.eval()


def load_source(source, head: str = "encoder"):
    """-> (encoder, projector or None, info). info as trainer.checkpoint.load_encoder's, plus `source`."""
    if head not in HEADS:
        raise ExportError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if isinstance(source, str) and source.startswith(RANDOM_PREFIX):
        encoder, projector, info = _random_encoder(source, head)
    else:
        path = Path(source)
        if head == "projector":  # the projector lives only in the full checkpoint
            ckpt_path = path / CHECKPOINT_NAME if path.is_dir() else path
            if ckpt_path.suffix == ".safetensors" or (path.is_dir() and not ckpt_path.is_file()):
                raise ExportError(f"--head projector needs the full training checkpoint ({CHECKPOINT_NAME}); "
                                  f"{path} holds only the encoder ({ENCODER_NAME} has no projector)")
            path = ckpt_path
        encoder, info = load_encoder(path)
        stored = info["fingerprint"]
        actual = weights_fingerprint(encoder.state_dict())
        if stored != actual:
            raise CheckpointError(f"{path}: the weights do not match their recorded fingerprint "
                                  f"({actual} != {stored}); the file was modified or damaged")
        projector = _projector_from_checkpoint(path, info["embedding_dim"]) if head == "projector" else None
    info["source"] = str(source)
    if projector is not None:
        # the fingerprint names the exported weights; the encoder's own stays for matching encoder files
        info["encoder_fingerprint"] = info["fingerprint"]
        state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                 **{f"projector.{k}": v for k, v in projector.state_dict().items()}}
        info["fingerprint"] = weights_fingerprint(state)
        info["embedding_dim"] = projector.net[-1].out_features
    return encoder, projector, info


# ============================================================================================
# The exported module
# ============================================================================================
class EmbeddingModel(nn.Module):
    """What the ONNX graph computes: (uint8 NHWC -> normalised NCHW) -> encoder [-> projector]."""

    def __init__(self, encoder: nn.Module, projector: nn.Module | None, preprocessing: Preprocessing,
                 input_kind: str, half: bool = False):
        super().__init__()
        self.encoder, self.projector, self.input_kind, self.half_ = encoder, projector, input_kind, half
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        if self.input_kind == "uint8":
            # the preprocessing contract's step 4, in float32 whatever the weights' precision
            # (contiguous: NCHW strides, else torch.export lowers the final flatten to a strided gather)
            x = normalize_unit_tensor(x.permute(0, 3, 1, 2).contiguous().float() / 255.0, self.mean, self.std)
        if self.half_:
            x = x.half()
        y = self.encoder(x)
        if self.projector is not None:
            y = self.projector(y)
        return y.float() if self.half_ else y


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy with every BatchNorm folded into the convolution or linear layer before it, in float32.

    The exporters fold in the weights' precision; folding first keeps float16 exports accurate.
    """
    from torch.fx.experimental.optimization import fuse
    return fuse(copy.deepcopy(module).float().eval(), inplace=True)


def export_module(module: nn.Module, example: torch.Tensor, input_name: str, opset: int, exporter: str):
    """torch -> onnx.ModelProto with a dynamic batch axis named BATCH_DIM."""
    import onnx
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_DIM, min=1, max=1 << 16)
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=[input_name], output_names=[OUTPUT],
                                        dynamic_shapes=({0: batch},), external_data=False, verbose=False)
            model = program.model_proto
        elif exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[OUTPUT],
                              dynamic_axes={input_name: {0: BATCH_DIM}, OUTPUT: {0: BATCH_DIM}})
            model = onnx.load_from_string(buf.getvalue())
        else:
            raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}")
    return model


def simplify_graph(model):
    """ONNX Runtime's basic, provider-independent graph optimisations, saved back as plain ONNX:
    constant folding, redundant node elimination (Identity, Flatten after pooling), Conv/Add fusions."""
    import tempfile

    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        out = onnx.load(dst)
    del out.metadata_props[:]
    return out


# ============================================================================================
# Verification
# ============================================================================================
def verification_images(pre: Preprocessing, n_random: int = VERIFY_RANDOM, n_pictures: int = VERIFY_PICTURES,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] batches: noise (with the all-0 and all-255 extremes), and picture-like images
    (shapes on tinted backgrounds, of other sizes and aspect ratios) put through the preprocessing
    contract's resize and crop, as a client would."""
    from PIL import Image, ImageFilter

    from trainer.synthetic import SHAPES, draw_shape

    rng = np.random.default_rng(seed)
    s = pre.input_size
    noise = rng.integers(0, 256, size=(n_random, s, s, 3), dtype=np.uint8)
    if n_random >= 2:
        noise[0], noise[1] = 0, 255
    pictures = []
    for i in range(n_pictures):
        side = int(rng.integers(max(16, s // 2), 2 * s + 1))
        image = draw_shape(rng, SHAPES[i % len(SHAPES)], side)
        w, h = (side, int(side * rng.uniform(0.6, 1.6))) if i % 2 else (int(side * rng.uniform(0.6, 1.6)), side)
        image = image.resize((max(8, w), max(8, h)), Image.BILINEAR).filter(ImageFilter.GaussianBlur(0.6))
        pictures.append(pre(image))
    return noise, np.stack(pictures) if pictures else np.zeros((0, s, s, 3), np.uint8)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-300), 1.0)


def ort_session(path, threads: int = 0):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verify_export(onnx_path, reference: nn.Module, pre: Preprocessing, input_kind: str, fp16: bool) -> dict:
    """ONNX Runtime against PyTorch eager (`reference`: float32, unfused) on generated images.

    The reference gets the contract's numpy normalisation (Preprocessing.normalize); the uint8 graph
    gets the raw pixels, so the in-graph normalisation is checked too. Raises VerificationError.
    """
    noise, pictures = verification_images(pre)
    batch = np.concatenate([noise, pictures])
    normalised = pre.normalize(batch)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(normalised)).float().numpy()
    feed = batch if input_kind == "uint8" else normalised
    name = INPUT_UINT8 if input_kind == "uint8" else INPUT_FLOAT
    session = ort_session(onnx_path)
    got = session.run([OUTPUT], {name: feed})[0]
    single = session.run([OUTPUT], {name: feed[:1]})[0]  # the dynamic batch axis at 1
    if got.shape != expected.shape or got.dtype != np.float32:
        raise VerificationError(f"ONNX Runtime returned {got.dtype} {list(got.shape)}, "
                                f"PyTorch float32 {list(expected.shape)}")
    got_all = np.concatenate([got, single])
    exp_all = np.concatenate([expected, expected[:1]])
    cos = _cosines(got_all, exp_all)
    diff = np.abs(got_all.astype(np.float64) - exp_all)
    n_noise = len(noise)
    report = {
        "images": {"noise": int(n_noise), "pictures": len(pictures), "batch_sizes": [len(batch), 1]},
        "max_abs_diff": float(diff.max()), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
        "max_abs_diff_noise": float(diff[:n_noise].max()) if n_noise else 0.0,
        "max_abs_diff_pictures": float(diff[n_noise:len(batch)].max()) if len(pictures) else 0.0,
        "reference_max_abs": float(np.abs(expected).max()),
        "tolerance": ({"min_cosine": FP16_MIN_COSINE} if fp16
                      else {"max_abs_diff": FP32_MAX_ABS, "min_cosine": FP32_MIN_COSINE}),
    }
    finite = bool(np.isfinite(got_all).all())
    ok = finite and cos.min() >= (FP16_MIN_COSINE if fp16 else FP32_MIN_COSINE)
    if not fp16:
        ok = ok and diff.max() <= FP32_MAX_ABS
    report["passed"] = bool(ok)
    if not ok:
        raise VerificationError(
            f"ONNX Runtime does not match PyTorch: max |diff| {report['max_abs_diff']:.3g}, min cosine "
            f"{report['min_cosine']:.7f}{'' if finite else ', non-finite outputs'} (allowed: "
            + ", ".join(f"{k} {v}" for k, v in report["tolerance"].items()) + ")")
    return report


# ============================================================================================
# The export
# ============================================================================================
def one_line(error: Exception) -> str:
    """The first line of an error's message (torch's loading errors run over several paragraphs)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def export_onnx(source, out_path, *, input_kind: str = "uint8", fp16: bool = False, head: str = "encoder",
                opset: int | None = None, simplify: bool = False, verify: bool = True,
                exporter: str = "dynamo", overwrite: bool = False, quiet: bool = True) -> dict:
    """Export `source` (run dir, checkpoint.pt, encoder.safetensors or random:ARCH[:STEM[:SIZE]]) to
    `out_path`, verify it and move it into place atomically. Returns a JSON-able report.

    Raises ExportError / CheckpointError (bad input) or VerificationError (wrong numbers); in both
    cases nothing is left at out_path.
    """
    import onnx
    t0 = time.perf_counter()
    out = Path(out_path)
    if input_kind not in INPUT_KINDS:
        raise ExportError(f"input must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
    if head not in HEADS:
        raise ExportError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 17 <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset must be between 17 and {onnx.defs.onnx_opset_version()}, got {opset}")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; --out names the .onnx file to write")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.suffix != ".onnx":
        raise ExportError(f"--out should end in .onnx, got {out.name}")

    _log(f"loading {source}", quiet)
    encoder, projector, info = load_source(source, head)
    pre: Preprocessing = info["preprocessing"]
    reference = EmbeddingModel(encoder, projector, pre, "float").eval()  # unfused float32 PyTorch

    module = EmbeddingModel(fold_batchnorm(encoder), fold_batchnorm(projector) if projector is not None else None,
                            pre, input_kind, half=fp16).eval()
    if fp16:
        module.encoder.half()
        if module.projector is not None:
            module.projector.half()
    s = pre.input_size
    if input_kind == "uint8":
        example, input_name = torch.zeros(2, s, s, 3, dtype=torch.uint8), INPUT_UINT8
    else:
        example, input_name = torch.zeros(2, 3, s, s), INPUT_FLOAT
    _log(f"exporting {info['arch']} ({info['stem']} stem, {s} px, {input_kind} input, "
         f"{'float16' if fp16 else 'float32'} weights, opset {opset}, {exporter} exporter)", quiet)
    t_export = time.perf_counter()
    model = export_module(module, example, input_name, opset, exporter)
    if simplify:
        model = simplify_graph(model)
    t_export = time.perf_counter() - t_export

    metadata = {"arch": info["arch"], "stem": info["stem"], "embedding_dim": int(info["embedding_dim"]),
                "head": head, "input": input_kind, "preprocessing": pre.to_dict(),
                "fingerprint": info["fingerprint"], "byolkit_version": __version__,
                "input_name": input_name, "output_name": OUTPUT, "weights": "float16" if fp16 else "float32",
                "opset": opset, "step": int(info.get("step", 0))}
    if "encoder_fingerprint" in info:
        metadata["encoder_fingerprint"] = info["encoder_fingerprint"]
    # the lowest IR version that carries this opset (8 for opset 18), not the exporter's newest (10):
    # older runtimes (ONNX Runtime < 1.18, TensorRT 8.6) refuse files with a newer IR version
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: encode_metadata(metadata)})
    model.producer_name, model.producer_version = "byolkit", __version__
    model.doc_string = (f"byolkit BYOL {head}: {info['arch']} ({info['stem']} stem) -> {OUTPUT} "
                        f"[{BATCH_DIM}, {metadata['embedding_dim']}]")
    if model.ByteSize() >= 2 ** 31:
        raise ExportError("the model is above protobuf's 2 GB limit for a single ONNX file")

    report: dict = {}

    def write(tmp: str) -> None:
        onnx.save_model(model, tmp)
        _log("checking the graph (onnx.checker) and comparing ONNX Runtime with PyTorch", quiet)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except onnx.checker.ValidationError as e:
            raise VerificationError(f"the ONNX checker rejects the exported graph: {e}") from None
        report["verification"] = (verify_export(tmp, reference, pre, input_kind, fp16) if verify
                                  else {"passed": None, "skipped": True})

    t_verify = time.perf_counter()
    missing_parents = [p for p in reversed(out.parents) if not p.exists()]
    try:
        atomic_write(out, write)
    except BaseException:
        for parent in reversed(missing_parents):  # the folders this export created, deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    t_verify = time.perf_counter() - t_verify
    report.update({
        "onnx": str(out), "source": str(source), "size_bytes": out.stat().st_size,
        "metadata": metadata,
        "input": {"name": input_name, "dtype": input_kind if input_kind == "uint8" else "float32",
                  "shape": [BATCH_DIM, s, s, 3] if input_kind == "uint8" else [BATCH_DIM, 3, s, s]},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": [BATCH_DIM, metadata["embedding_dim"]]},
        "exporter": exporter, "simplified": bool(simplify), "fp16": bool(fp16), "opset": opset,
        "seconds": {"export": round(t_export, 2), "verify": round(t_verify, 2),
                    "total": round(time.perf_counter() - t0, 2)},
    })
    return report


# ============================================================================================
# Command line
# ============================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.onnx", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a byolkit encoder to ONNX (dynamic batch, preprocessing inside the graph, "
                    "metadata), verified against PyTorch with ONNX Runtime.",
        epilog="Sources: a run directory (encoder.safetensors, else checkpoint.pt), a checkpoint.pt, an\n"
               "encoder.safetensors, or random:ARCH[:STEM[:INPUT_SIZE]] for a seeded random encoder (for tests;\n"
               "its BatchNorm scales are calibrated on generated images so that its features have a trained\n"
               f"encoder's scale; architectures: {', '.join(ARCHITECTURES)}; stems: {', '.join(STEMS)}).\n\n"
               "Input uint8 (default): tensor 'images' uint8 [N, H, W, 3], RGB as decoded, resized and\n"
               "centre-cropped by contract.preprocess (Preprocessing.__call__); normalised in the graph.\n"
               "Input float: tensor 'pixel_values' float32 [N, 3, H, W], normalised by the client.\n"
               "Output: 'embeddings' float32 [N, D]. Read the metadata with export.onnx.read_metadata.\n\n"
               "Exit status: 0 done, 1 verification failed (nothing written), 2 bad input or an int8 model\n"
               "refused by its guard (nothing written).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run directory, checkpoint.pt, encoder.safetensors, or random:ARCH[:STEM[:SIZE]]; "
                        "with --int8 also a float32 .onnx export")
    p.add_argument("--out", required=True, metavar="MODEL.onnx", help="the ONNX file to write (must not exist)")
    p.add_argument("--input", choices=INPUT_KINDS, default="uint8",
                   help="graph input: uint8 NHWC pixels (default) or float32 NCHW normalised")
    p.add_argument("--fp16", action="store_true",
                   help="float16 weights and compute (input and output stay uint8/float32); for GPUs")
    p.add_argument("--head", choices=HEADS, default="encoder",
                   help="encoder: the pooled backbone feature (default); projector: the projector's output "
                        "(needs the full checkpoint.pt)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--simplify", action="store_true",
                   help="save ONNX Runtime's basic graph optimisations into the file (measured: no speed-up "
                        "for ResNets, see BENCHMARKS.md)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx exporter: dynamo (default, torch.export based) or the legacy torchscript one")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    q = p.add_argument_group(
        "int8 (export.quantize)",
        "Static int8 quantisation for CPUs: --checkpoint may then also be a float32 .onnx export. The calibration\n"
        "images are split (seeded) into a calibration part and a held-back part never calibrated on; the file\n"
        "is written only if recall@10 of the int8 model's neighbours among the held-back images, against the\n"
        "float32 model's, reaches --min-recall. The figures go into the file's byolkit metadata.")
    q.add_argument("--int8", action="store_true", help="write an int8 (QDQ) model instead of a float one")
    q.add_argument("--calibration", metavar="IMAGES",
                   help="calibration images: a folder, zip archive or data set name (cifar10:test), as for training")
    q.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_METHOD,
                   help="how activation ranges are chosen (default %(default)s; measured in BENCHMARKS.md)")
    q.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help="images to calibrate on (default %(default)s)")
    q.add_argument("--held-back", type=int, default=DEFAULT_HELD_BACK,
                   help="images held back for the guard (default %(default)s; at least 11). Its recall is "
                        "for a gallery of this size: in larger ones close neighbours swap more (BENCHMARKS.md)")
    q.add_argument("--min-recall", type=float, default=DEFAULT_MIN_RECALL,
                   help="refuse the int8 model below this recall@10 against float32 neighbours (default %(default)s)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.int8:
        return _main_int8(args)
    if args.calibration:
        print("error: --calibration is for --int8 exports", file=sys.stderr)
        return 2
    try:
        report = export_onnx(args.checkpoint, args.out, input_kind=args.input, fp16=args.fp16, head=args.head,
                             opset=args.opset, simplify=args.simplify, exporter=args.exporter,
                             overwrite=args.overwrite, quiet=args.quiet)
    except (ExportError, CheckpointError, MetadataError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"error: verification failed, nothing written: {one_line(e)}", file=sys.stderr)
        return 1
    v = report["verification"]
    _log(f"wrote {report['onnx']} ({report['size_bytes'] / 1e6:.1f} MB): max |diff| {v['max_abs_diff']:.2e}, "
         f"min cosine {v['min_cosine']:.7f} against PyTorch", args.quiet)
    print(json.dumps(report))
    return 0


def _main_int8(args) -> int:
    from .quantize import QuantizationError, export_int8
    if args.fp16:
        print("error: --int8 and --fp16 exclude each other", file=sys.stderr)
        return 2
    try:
        report = export_int8(args.checkpoint, args.out, args.calibration, method=args.calibration_method,
                             calibration_images=args.calibration_images, held_back=args.held_back,
                             min_recall=args.min_recall, overwrite=args.overwrite, quiet=args.quiet,
                             input_kind=args.input, head=args.head, opset=args.opset, exporter=args.exporter)
    except (ExportError, CheckpointError, MetadataError, QuantizationError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"error: verification of the float32 export failed, nothing written: {one_line(e)}", file=sys.stderr)
        return 1
    g = report["guard"]
    _log(f"wrote {report['onnx']} ({report['size_bytes'] / 1e6:.2f} MB, {report['size_ratio']}x smaller): "
         f"recall@10 {g['recall_at_10']} against float32 neighbours, cosine mean {g['cosine_mean']} "
         f"min {g['cosine_min']} on {g['images']} held-back images", args.quiet)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
