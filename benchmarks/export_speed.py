"""Inference speed of the exported encoder: ONNX Runtime against PyTorch eager, on this machine's CPU.

    python benchmarks/export_speed.py --json benchmarks/results/export_speed.json
    python benchmarks/export_speed.py --tiny            # seconds: the test suite's smoke run

For ResNet-18 and ResNet-50 at 224 px (random weights: speed does not depend on their values), in
one process, in alternating rounds (a background load hits every contender alike):

  pytorch            eager float32, NCHW, torch.inference_mode, on the normalised float batch
  pytorch_cl         the same in channels-last memory format (oneDNN's preferred layout on CPUs)
  ort                ONNX Runtime (CPU provider, all graph optimisations) on the float-input export
  ort_uint8          ONNX Runtime on the default uint8 export (scaling, normalisation, layout in the graph)
  ort_simplified     the float export with ONNX Runtime's basic optimisations saved into the file
  ort_torchscript    the float export made by torch's legacy TorchScript exporter
  ort_int8           the int8 export of the uint8 one (export.quantize: QDQ, per-channel weights, calibrated
                     on --calibration or on generated pictures; its guard is recorded, not enforced:
                     random weights), compared with ort_uint8 as `int8_vs_float32`

at batch 1, 8 and 32, reporting the median images/s over the rounds and the ratios against
`pytorch`. Each export's file size and verification error (export.onnx's own check against PyTorch)
are reported for float32 and float16 weights. ONNX Runtime's idle threads do not spin (see ort_session).
Where CUDA is available (onnxruntime-gpu), ONNX Runtime's CUDA and TensorRT execution providers are
timed on the float32 and float16 exports too.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, onnxruntime_info, write_json  # puts the repository root on sys.path

import export.onnx as xo
from contract.deployment import INPUT_FLOAT, INPUT_UINT8, OUTPUT
from serving.engine import require_providers


def ort_session(path: Path, threads: int, provider: str = "CPUExecutionProvider", cache_dir: str | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: with several sessions alive in one process, a
    # session's spinning threads took the cores from the next contender (measured: the same graph
    # ran 10-20% slower when timed right after another session).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [provider]
    if provider == "TensorrtExecutionProvider":
        opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir or "."}
        providers = [(provider, opts), "CUDAExecutionProvider"]
    session = ort.InferenceSession(str(path), so, providers=providers)
    require_providers(session, providers)  # never a CPU figure reported as a GPU one
    return session


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_torch(model, x):
    with torch.inference_mode():
        return model(x)


def timed(fn, iters: int) -> float:
    """Seconds per call, over `iters` calls (warm up first)."""
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


VARIANTS = {  # export name -> export_onnx options
    "float32": {}, "float16": {"fp16": True}, "float": {"input_kind": "float"},
    "float_simplified": {"input_kind": "float", "simplify": True},
    "float_torchscript": {"input_kind": "float", "exporter": "torchscript"},
    "int8": {},  # export.quantize of the float32 export
}
SESSIONS = {"ort": "float", "ort_uint8": "float32", "ort_simplified": "float_simplified",
            "ort_torchscript": "float_torchscript", "ort_int8": "int8"}  # contender -> export
UINT8_SESSIONS = ("ort_uint8", "ort_int8")


def calibration_folder(workdir: Path, size: int, count: int = 96) -> Path:
    """Generated picture-like images (export.onnx's verification pictures) for calibrating random encoders."""
    from PIL import Image

    from contract.preprocess import Preprocessing
    folder = workdir / "calibration"
    if not folder.is_dir():
        folder.mkdir()
        pre = Preprocessing(input_size=size, resize_size=size, mean=(0.5,) * 3, std=(0.25,) * 3)
        _, pictures = xo.verification_images(pre, 0, count, seed=7)
        for i, picture in enumerate(pictures):
            Image.fromarray(picture).save(folder / f"{i:03d}.png")
    return folder


def export_int8(source_file: Path, out: Path, calibration) -> dict:
    from export.quantize import export_int8 as quantize
    report = quantize(source_file, out, calibration, min_recall=0, calibration_images=64, held_back=32)
    g = report["guard"]
    return {"size_mb": round(report["size_bytes"] / 1e6, 2), "size_ratio_vs_float32": report["size_ratio"],
            "guard_recall_at_10": g["recall_at_10"], "min_cosine": g["cosine_min"],
            "export_s": report["seconds"]["quantize"], "calibration": str(calibration)}


def export_variants(arch: str, stem: str, size: int, workdir: Path, variants: list[str],
                    calibration=None) -> tuple[dict, dict]:
    """-> (files, exports): each variant's path, and its size, verification error and export time."""
    source = f"random:{arch}:{stem}:{size}"
    files, exports = {}, {}
    for key in variants:
        files[key] = workdir / f"{arch}_{key}.onnx"
        log(f"{arch}: exporting {key}")
        if key == "int8":
            exports[key] = export_int8(files["float32"], files[key], calibration or calibration_folder(workdir, size))
            continue
        report = xo.export_onnx(source, files[key], **VARIANTS[key])
        v = report["verification"]
        exports[key] = {"size_mb": round(report["size_bytes"] / 1e6, 2), "max_abs_diff": v["max_abs_diff"],
                        "min_cosine": v["min_cosine"], "export_s": report["seconds"]["export"]}
    return files, exports


def real_image_errors(arch: str, stem: str, size: int, files: dict, collection_path: str, count: int) -> dict:
    """ONNX Runtime against PyTorch on `count` real photos (spread over the collection, e.g. CIFAR-10's
    test split), put through the preprocessing contract, for the float32 and float16 uint8 exports."""
    from trainer.data import open_collection
    collection = open_collection(collection_path)
    encoder, _, info = xo.load_source(f"random:{arch}:{stem}:{size}")
    pre = info["preprocessing"]
    picks = [i * len(collection) // count for i in range(count)]
    pixels = np.stack([pre.resize_and_crop(collection.load(i)) for i in picks])
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(pre.normalize(pixels))).numpy().astype(np.float64)
    out = {"images": count, "source": collection.description}
    for key in ("float32", "float16"):
        if key in files:
            got = ort_session(files[key], torch.get_num_threads()).run([OUTPUT], {INPUT_UINT8: pixels})[0]
            got = got.astype(np.float64)
            cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
            out[key] = {"max_abs_diff": float(np.abs(got - expected).max()), "min_cosine": float(cos.min())}
    return out


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def bench_arch(arch: str, stem: str, size: int, files: dict, batches: list[int], rounds: int, iters: int,
               min_images: int, threads: int) -> dict:
    """Images/s of every contender at every batch size, in alternating rounds.

    cpu_share: this process's CPU time over wall time x threads during the timing. Near 1 the
    benchmark had its cores; well below 1, something else ran (the figures are then not kept).
    """
    encoder, _, info = xo.load_source(f"random:{arch}:{stem}:{size}")
    pre = info["preprocessing"]
    encoder_cl = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    load, sessions = {}, {}
    for name, key in SESSIONS.items():
        if key in files:
            t = time.perf_counter()
            sessions[name] = ort_session(files[key], threads)
            load[name] = round(time.perf_counter() - t, 3)

    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        x = pre.normalize(pixels)
        xt = torch.from_numpy(x)
        xt_cl = xt.contiguous(memory_format=torch.channels_last)
        contenders = {"pytorch": partial(run_torch, encoder, xt), "pytorch_cl": partial(run_torch, encoder_cl, xt_cl)}
        for name, sess in sessions.items():
            feed = {INPUT_UINT8: pixels} if name in UINT8_SESSIONS else {INPUT_FLOAT: x}
            contenders[name] = partial(sess.run, [OUTPUT], feed)
        per_round = {k: [] for k in contenders}
        n = max(iters, -(-min_images // batch))  # more calls for small batches, so that each round lasts
        for fn in contenders.values():  # warm-up: allocations, kernel choices, layout caches
            fn()
        wall, cpu = time.perf_counter(), cpu_seconds()
        for r in range(rounds):
            for name, fn in contenders.items():
                per_round[name].append(batch / timed(fn, n))
            log(f"{arch} batch {batch} round {r + 1}/{rounds}: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in per_round.items()))
        share = (cpu_seconds() - cpu) / ((time.perf_counter() - wall) * threads)
        med = {k: round(statistics.median(v), 2) for k, v in per_round.items()}
        ratios = {k: round(med[k] / med["pytorch"], 2) for k in med if k != "pytorch"}
        round_ratio = statistics.median(o / p for o, p in zip(per_round["ort"], per_round["pytorch"]))
        int8 = {"int8_vs_float32": round(med["ort_int8"] / med["ort_uint8"], 2)} if "ort_int8" in med else {}
        results[str(batch)] = {"images_per_s": med, "ratio_vs_pytorch": ratios, **int8,
                               "ort_vs_pytorch_median_of_round_ratios": round(round_ratio, 2),
                               "cpu_share": round(share, 3), "load_average": os.getloadavg()[0],
                               "rounds": {k: [round(v, 2) for v in vs] for k, vs in per_round.items()}}
    return {"input_size": size, "session_load_s": load, "batches": results}


def bench_gpu(files, size, batches, rounds, iters, workdir) -> dict | None:
    """ONNX Runtime's CUDA and TensorRT providers, when this onnxruntime has them and a GPU is present."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
        return None
    out = {"device": torch.cuda.get_device_name(0)}
    providers = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
    rng = np.random.default_rng(0)
    for provider in providers:
        for key in ("float32", "float16"):
            if key not in files:
                continue
            try:
                sess = ort_session(files[key], 0, provider, cache_dir=str(workdir / "trt"))
            except Exception as e:  # noqa: BLE001 - a provider that fails to load is reported, not fatal
                out[f"{provider}/{key}"] = {"error": str(e).splitlines()[0]}
                continue
            res = {}
            for batch in batches:
                pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                run = partial(sess.run, [OUTPUT], {INPUT_UINT8: pixels})
                run()  # warm-up (TensorRT builds its engine here)
                speeds = [batch / timed(run, 10 * iters) for _ in range(rounds)]
                res[str(batch)] = round(statistics.median(speeds), 1)
            out[f"{provider}/{key}"] = {"images_per_s": res}
            log(f"{provider} {key}: {res}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet18,resnet50", help="comma-separated architectures")
    p.add_argument("--stem", default="imagenet", choices=["imagenet", "small"], help="their stem (default imagenet)")
    p.add_argument("--calibration", default=None, metavar="IMAGES",
                   help="calibration images for the int8 variant (default: generated pictures)")
    p.add_argument("--size", type=int, default=224, help="input size in pixels")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size")
    p.add_argument("--iters", type=int, default=2, help="timed calls per contender and round, at least")
    p.add_argument("--min-images", type=int, default=16, help="images per contender and round, at least")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for PyTorch and ONNX Runtime")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"exports to make (of {', '.join(VARIANTS)})")
    p.add_argument("--tiny", action="store_true",
                   help="ResNet-18 small stem at 16 px, batches 1 and 2, one round, three exports")
    p.add_argument("--real-images", default=None, metavar="PATH",
                   help="also measure the export error on real photos: an image folder or zip (e.g. CIFAR-10's "
                        "test.zip), put through the preprocessing contract")
    p.add_argument("--real-count", type=int, default=64, help="how many of them (spread over the collection)")
    p.add_argument("--no-timing", action="store_true", help="exports and errors only")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    stem = args.stem
    if args.tiny:
        args.archs, args.size, args.batches, args.rounds, args.iters, stem = "resnet18", 16, "1,2", 1, 1, "small"
        args.variants, args.min_images = "float32,float,int8", 1
    variants = args.variants.split(",")
    if "float" not in variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}, including float (the baseline's graph)")
    if "int8" in variants and "float32" not in variants:
        p.error("--variants: int8 is made from float32; list both")
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    result = {"date": started.isoformat(timespec="seconds"), "machine": machine(**onnxruntime_info()),
              "load_average_start": os.getloadavg(), "command": " ".join(sys.argv), "models": {}}
    batches = [int(b) for b in args.batches.split(",")]
    archs = args.archs.split(",")
    with tempfile.TemporaryDirectory(prefix="byolkit-export-speed-") as tmp:
        files = {}
        for arch in archs:  # every export first, so that the timings run back to back
            files[arch], exports = export_variants(arch, stem, args.size, Path(tmp), variants, args.calibration)
            result["models"][arch] = {"source": f"random:{arch}:{stem}:{args.size}", "exports": exports}
        if args.real_images:
            for arch in archs:
                log(f"{arch}: errors on {args.real_count} images of {args.real_images}")
                result["models"][arch]["real_images"] = real_image_errors(
                    arch, stem, args.size, files[arch], args.real_images, args.real_count)
        result["load_average_timing_start"] = os.getloadavg()
        for arch in (archs if not args.no_timing else []):
            result["models"][arch].update(bench_arch(arch, stem, args.size, files[arch], batches, args.rounds,
                                                     args.iters, args.min_images, args.threads))
        for arch in (archs if not args.no_timing else []):
            gpu = bench_gpu(files[arch], args.size, batches, args.rounds, args.iters, Path(tmp))
            if gpu:
                result["models"][arch]["gpu"] = gpu
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = round((datetime.datetime.now().astimezone() - started).total_seconds(), 1)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result, indent=2))
    for arch, r in result["models"].items():
        for batch, b in r.get("batches", {}).items():
            log(f"{arch} batch {batch}: " + ", ".join(f"{k} {v}" for k, v in b["images_per_s"].items())
                + f" | ort/pytorch {b['ratio_vs_pytorch']['ort']}"
                + (f" | int8/float32 {b['int8_vs_float32']}" if "int8_vs_float32" in b else "")
                + f" | cpu share {b['cpu_share']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
