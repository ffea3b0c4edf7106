"""Everything worth measuring on one GPU, prepared for a short machine window: two calls, each
writing its JSON as it goes (a run cut off keeps every check it finished).

  smoke    (~3 min, stops at the first failure) the CUDA code paths, end to end:
           environment (versions, GPU, which optional packages exist);
           collectives under torchrun --nproc_per_node 1 (NCCL): CPU tensors in, the device's out;
           pretraining (cifar10-resnet18 on the subset) under torchrun --nproc_per_node 1 (DDP,
           SyncBatchNorm, NCCL, the time budget's all-reduce, the rank-0 kNN monitor), stopped after
           40 steps with a checkpoint, resumed (RNG state of this device) to step 80;
           the stream pipeline (decoding workers, pinned memory, side-stream copies);
           evaluation (python -m trainer.evaluate knn) of the pretrained encoder.
  figures  (~8 min, each figure skipped with a note when the part's time is out)
           ResNet-50 @224, batch 256, bf16, channels_last: the step by phase and its MFU
           (benchmarks/pretrain_speed.py), eager, then --compile (compile_speedup: the ratio);
           the real trainer on generated 256 px JPEGs, memory and stream pipelines: images/s and the
           data-wait share (steady-state log windows, checkpoint writes left out);
           CIFAR-10 ResNet-18 (the subset): kNN top-1 against wall-clock over a 2-minute budget;
           the ONNX export of that encoder against PyTorch on CUDA (ONNX Runtime's CUDA provider,
           asserted; with only the CPU onnxruntime present, the CPU provider, said so in a note).

Prepare once, on a machine with ../shared (writes benchmarks/data/cifar10-subset/, git-ignored,
34 MiB: 3000 training and 500 test images of each class as the original JPEGs):

    python benchmarks/gpu_oneshot.py --prepare

Then on the GPU machine, from the repository root, with its own Python (no install step; torch,
torchvision, Pillow, numpy, tqdm, safetensors needed; onnx, onnxscript and onnxruntime optional),
the folder benchmarks/data/cifar10-subset/ (train.zip, test.zip) beside the code:

    PYTHONPATH=. python3 benchmarks/gpu_oneshot.py --part smoke --out $OUT      # ~3 min, limit 300 s
    PYTHONPATH=. python3 benchmarks/gpu_oneshot.py --part figures --out $OUT    # ~8 min, limit 540 s

with this project's device tool:
    run(command="PYTHONPATH=. python3 benchmarks/gpu_oneshot.py --part smoke --out $OUT",
        carry=["benchmarks/data"], timeout_s=300)
    run(command="PYTHONPATH=. python3 benchmarks/gpu_oneshot.py --part figures --out $OUT",
        carry=["benchmarks/data"], timeout_s=540)

Each part writes OUT/gpu_oneshot_<part>.json (after every check) and OUT/gpu_oneshot_<part>.log
(the commands run and the tail of any failure). `--tiny` runs both parts on the CPU in about a
minute on two cores (the test suite's rehearsal; `--data` names a generated folder of the same layout).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, smooth_jpegs  # puts the repository root on sys.path

DEFAULT_DATA = ROOT / "benchmarks" / "data" / "cifar10-subset"
PER_CLASS = {"train": 3000, "test": 500}
BUDGET_S = {"smoke": 240, "figures": 480}  # each part stops starting checks when its time is out
GRACE_S = 40  # a check started in time may run this far past the budget (the command's limit is budget + 60)
REQUIRED = ("torch", "torchvision", "PIL", "numpy", "tqdm", "safetensors")
OPTIONAL = ("onnx", "onnxscript", "onnxruntime", "tensorboard")
# the child processes run like this one: `python -S` (no site packages processed) stays so
PY = [sys.executable, *(["-S"] if sys.flags.no_site else [])]


class CheckFailed(RuntimeError):
    pass


# ============================================================================================
# Running checks
# ============================================================================================
class Part:
    """One part's results: OUT/gpu_oneshot_<name>.json, rewritten after every check."""

    def __init__(self, name: str, out: Path, budget_s: float, tiny: bool, device: str):
        self.name, self.budget_s, self.tiny, self.device = name, budget_s, tiny, device
        self.t0 = time.monotonic()
        self.path, self.log_path = out / f"gpu_oneshot_{name}.json", out / f"gpu_oneshot_{name}.log"
        self.doc = {"part": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "tiny": tiny, "device": device, "budget_s": budget_s, "checks": {}, "complete": False}
        self.log_path.write_text("")
        self.write()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        os.replace(tmp, self.path)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def check(self, key: str, need_s: float, fn, cap_s: float = 300) -> bool:
        """Run fn(timeout) -> dict unless fewer than `need_s` seconds are left; record the outcome.
        Its commands are stopped after `cap_s` seconds, or GRACE_S past the part's budget."""
        if self.left() < need_s:
            self.doc["checks"][key] = {"status": "skipped",
                                       "note": f"needs ~{need_s:.0f}s, {max(self.left(), 0):.0f}s of the part left"}
            self.log(f"[{self.name}] {key}: skipped (out of time)")
            self.write()
            return False
        self.log(f"[{self.name}] {key} ...")
        t = time.monotonic()
        try:
            entry = {"status": "ok", **fn(min(cap_s, max(self.left(), 0) + GRACE_S))}
        except Exception as e:  # noqa: BLE001 - a harness: every failure is recorded, the part goes on or stops
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:]}
        entry["seconds"] = round(time.monotonic() - t, 1)
        self.doc["checks"][key] = entry
        self.log(f"[{self.name}] {key}: {entry['status']} in {entry['seconds']}s"
                 + (f"\n{entry['error']}" if entry["status"] == "failed" else ""))
        self.write()
        return entry["status"] == "ok"

    def finish(self) -> bool:
        statuses = [c["status"] for c in self.doc["checks"].values()]
        self.doc["complete"] = True
        self.doc["passed"] = "failed" not in statuses
        self.write()
        return self.doc["passed"]


def sh(part: Part, args: list, timeout: float, cwd: Path = ROOT,
       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this tree first on the Python path; its failure raises with its output's tail."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if part.tiny:
        env["OMP_NUM_THREADS"] = "1"
    part.log("  $ " + " ".join(map(str, args)))
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-2500:]}")
    return proc


def torchrun(part: Part, args: list, timeout: float) -> subprocess.CompletedProcess:
    """`args` as one process of a torchrun group (--nproc_per_node 1). --tiny starts that process
    itself with the environment torchrun gives it: the launcher's start-up would be a tenth of the
    rehearsal's time."""
    if not part.tiny:
        return sh(part, [*PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args], timeout)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "oneshot-tiny"}
    return sh(part, [*PY, *args], timeout, env=env)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steady(rows: list[dict]) -> dict:
    """Median images/s and data-wait share of the log windows after the first third (warm-up:
    cudnn autotuning, allocator growth, workers starting). Checkpoint writes are not in them."""
    rows = [r for r in rows if "images_per_s" in r]
    rows = rows[len(rows) // 3:] or rows
    return {"images_per_s": round(statistics.median(r["images_per_s"] for r in rows), 1),
            "data_wait_fraction": round(statistics.median(r["data_wait"] for r in rows), 4),
            "windows": len(rows)}


# ============================================================================================
# Smoke
# ============================================================================================
def _version(module: str) -> str:
    import importlib.metadata
    for dist in ({"PIL": "pillow"}.get(module, module), f"{module}-gpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "present"


def check_environment(part: Part, timeout: float) -> dict:
    import importlib.util

    import torch
    modules = {}
    for name in (*REQUIRED, *OPTIONAL):
        try:
            if name in REQUIRED:
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:  # the optional ones: found, not imported (seconds)
                raise ImportError("not installed")
            modules[name] = _version(name)
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
            modules[name] = None
            part.log(f"  {name}: not importable ({type(e).__name__}: {e})")
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "modules": modules,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "trainer_from": str(Path(importlib.import_module("trainer").__file__).parent)}
    part.doc["environment"] = info
    missing = [m for m in REQUIRED if modules[m] is None]
    if missing:
        raise CheckFailed(f"required packages missing: {', '.join(missing)}")
    if part.device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device visible to torch")
    return {"gpu": info["gpu"], "torch": info["torch"]}


def collectives_child(device_type: str) -> int:
    """Run under torchrun: every helper of trainer/distributed.py with CPU tensors handed in."""
    import torch

    from trainer.distributed import all_gather_objects, all_reduce, all_reduce_mean, barrier, init_distributed, shutdown
    d = init_distributed(device_type)
    assert d.enabled, "torchrun launched this process, but it did not join a process group"
    x = torch.tensor([1.0, 2.0]) * (d.rank + 1)  # on the CPU, as the crashing code handed them to NCCL
    total, top, mean = all_reduce(x, d), all_reduce(x, d, "max"), all_reduce_mean(x, d)
    counts = all_reduce(torch.ones(3, 3, dtype=torch.int64), d)  # segment's confusion matrix
    ranks = all_gather_objects({"rank": d.rank}, d)
    barrier(d)
    result = {"backend": torch.distributed.get_backend(), "world": d.world, "device": str(total.device),
              "trainer_from": str(Path(sys.modules["trainer"].__file__).parent),
              "sum": total.tolist(), "max": top.tolist(), "mean": mean.tolist(), "counts": int(counts.sum()),
              "gathered": ranks}
    assert total.device == d.device == top.device == counts.device, result
    assert total.tolist() == [sum(r + 1.0 for r in range(d.world)), sum(2.0 * (r + 1) for r in range(d.world))]
    shutdown(d)
    if d.is_main:
        print(json.dumps(result))
    return 0


def check_collectives(part: Part, timeout: float) -> dict:
    proc = torchrun(part, [Path(__file__), "--collectives-child", part.device], timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cifar_flags(part: Part, data: Path) -> list:
    flags = ["--preset", "cifar10-resnet18", "--data", data / "train.zip", "--device", part.device, "--no-progress"]
    if part.tiny:
        flags += ["--arch", "resnet18_w16", "--batch-size", "8", "--set", "model.projector_hidden_dim=32",
                  "--set", "model.predictor_hidden_dim=32", "--set", "data.workers=0", "--set", "run.precision=fp32"]
    else:
        flags += ["--set", f"data.workers={min(12, os.cpu_count() or 1)}"]
    return flags


def check_pretrain_resume(part: Part, data: Path, work: Path, timeout: float) -> dict:
    run = work / "c10"
    steps, stop = (6, 3) if part.tiny else (80, 40)
    flags = [*cifar_flags(part, data), "--val-data", data / "test.zip", "--out", run, "--max-steps", steps,
             "--time-budget", "10m", "--set", "run.checkpoint_every=20", "--set", "run.log_every=5",
             "--set", f"run.knn_max_images={40 if part.tiny else 5000}"]
    t = time.monotonic()
    torchrun(part, ["-m", "trainer.pretrain", *flags, "--stop-after-steps", stop], timeout)
    import torch
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if int(ckpt["step"]) != stop:
        raise CheckFailed(f"the stopped run's checkpoint is at step {ckpt['step']}, not {stop}")
    torchrun(part, ["-m", "trainer.pretrain", *flags, "--resume"], timeout - (time.monotonic() - t))
    summary = json.loads((run / "summary.json").read_text())
    rows = [r for r in metrics_rows(run) if "loss" in r]
    if summary["steps"] != steps or summary["world_size"] != 1 or not rows:
        raise CheckFailed(f"unexpected summary {summary}")
    if not all(abs(r["loss"]) < 100 for r in rows) or not 0 <= summary["knn_top1"] <= 1:
        raise CheckFailed(f"non-finite loss or kNN out of range: {summary}")
    return {"summary": summary, "losses": [round(r["loss"], 4) for r in rows]}


def check_stream(part: Part, data: Path, work: Path, timeout: float) -> dict:
    run = work / "c10-stream"
    steps = 4 if part.tiny else 60
    sh(part, [*PY, "-m", "trainer.pretrain", *cifar_flags(part, data), "--out", run, "--max-steps", steps,
              "--set", "data.pipeline=stream", "--set", "run.log_every=2" if part.tiny else "run.log_every=10"],
       timeout)
    summary = json.loads((run / "summary.json").read_text())
    if summary["pipeline"] != "stream" or summary["steps"] != steps:
        raise CheckFailed(f"unexpected summary {summary}")
    return {"summary": summary, **steady(metrics_rows(run))}


def check_evaluate(part: Part, data: Path, work: Path, timeout: float) -> dict:
    out = work / "knn.json"
    sh(part, [*PY, "-m", "trainer.evaluate", "knn", "--encoder", work / "c10", "--train", data / "train.zip",
              "--test", data / "test.zip", "--out", out, "--device", part.device, "--no-progress",
              "--workers", 0 if part.tiny else min(12, os.cpu_count() or 1)], timeout)
    result = json.loads(out.read_text())
    return {k: result[k] for k in result if k in ("top1", "top5", "num_train", "num_test", "k", "device", "precision")}


def part_smoke(part: Part, data: Path, work: Path) -> None:
    """In order; the first failure ends the part (what follows depends on it)."""
    for key, need, fn in (("environment", 5, lambda t: check_environment(part, t)),
                          ("collectives", 20, lambda t: check_collectives(part, t)),
                          ("pretrain_resume", 60, lambda t: check_pretrain_resume(part, data, work, t)),
                          ("stream_pipeline", 30, lambda t: check_stream(part, data, work, t)),
                          ("evaluate_knn", 20, lambda t: check_evaluate(part, data, work, t))):
        if not part.check(key, need, fn):
            part.log(f"[smoke] stopping after {key}")
            return


# ============================================================================================
# Figures
# ============================================================================================
def check_phases(part: Part, work: Path, compile_: bool, timeout: float) -> dict:
    out = work / f"speed{'-compile' if compile_ else ''}.json"
    if part.tiny:
        args = ["--preset", "imagenet-resnet50", "--device", "cpu", "--batch-size", "4", "--steps", "2",
                "--warmup", "1", "--num-images", "8", "--precision", "fp32", "--set", "model.arch=resnet18_w16",
                "--set", "data.image_size=32", "--set", "model.projector_hidden_dim=32",
                "--set", "model.predictor_hidden_dim=32"]
    else:
        args = ["--preset", "imagenet-resnet50", "--device", "cuda", "--batch-size", "256", "--steps", "30",
                "--warmup", "10" if compile_ else "8", "--num-images", "512"]
    sh(part, [*PY, ROOT / "benchmarks" / "pretrain_speed.py", *args, *(["--compile"] if compile_ else []),
              "--json", out], timeout)
    r = json.loads(out.read_text())
    keep = ("arch", "image_size", "batch_size", "precision", "channels_last", "compile", "steps", "images_per_s",
            "step_ms", "phases_ms", "phase_share", "flops_per_step", "achieved_flops_per_s", "peak_bf16_flops", "mfu")
    return {k: r[k] for k in keep}


def check_trainer_r50(part: Part, work: Path, pipeline: str, timeout: float) -> dict:
    images = work / "jpeg256"
    if not images.is_dir():
        smooth_jpegs(images, 16 if part.tiny else 1536, 72 if part.tiny else 256)
    run = work / f"r50-{pipeline}"
    if part.tiny:
        flags = ["--batch-size", "4", "--arch", "resnet18_w16", "--set", "data.image_size=64",
                 "--set", "model.projector_hidden_dim=32", "--set", "model.predictor_hidden_dim=32",
                 "--set", "data.workers=0", "--max-steps", "3", "--set", "run.log_every=1"]
    else:
        flags = ["--batch-size", "256", "--set", f"data.workers={min(14, os.cpu_count() or 1)}", "--max-steps", "48",
                 "--set", "run.log_every=6"]
    sh(part, [*PY, "-m", "trainer.pretrain", "--preset", "imagenet-resnet50", "--device", part.device, *flags,
              "--set", f"data.pipeline={pipeline}", "--set", "run.checkpoint_every=0",
              "--set", "run.checkpoint_every_s=0", "--data", images, "--out", run, "--no-progress"], timeout)
    summary = json.loads((run / "summary.json").read_text())
    return {"pipeline": pipeline, "steps": summary["steps"], "precision": summary["precision"],
            **steady(metrics_rows(run)), "checkpoint_seconds_at_end": summary.get("checkpoint_seconds")}


def check_cifar_knn(part: Part, data: Path, work: Path, timeout: float) -> dict:
    run = work / "c10-knn"
    # training seconds; decoding, the kNN runs and the ONNX figure after it need ~100 s more
    budget = 2 if part.tiny else int(max(60, min(120, timeout - GRACE_S - 100)))
    flags = [*cifar_flags(part, data), "--val-data", data / "test.zip", "--out", run,
             "--set", "run.checkpoint_every=0", "--set", "run.checkpoint_every_s=0"]
    flags += (["--max-steps", "4", "--set", "run.knn_every=1"] if part.tiny else
              ["--time-budget", f"{budget}s", "--epochs", "1000", "--set", "run.knn_every=4",
               "--set", "run.log_every=50"])
    sh(part, [*PY, "-m", "trainer.pretrain", *flags], timeout)
    summary = json.loads((run / "summary.json").read_text())
    curve = [{"step": r["step"], "train_seconds": round(r["train_seconds"], 1), "knn_top1": r["knn_top1"]}
             for r in metrics_rows(run) if "knn_top1" in r]
    return {"train_budget_s": budget, "summary": summary, "knn_curve": curve, **steady(metrics_rows(run))}


def onnx_parity_child(run: str, data: str, out: str) -> int:
    """Export `run`'s encoder to ONNX; its embeddings from ONNX Runtime against PyTorch's on the device."""
    import numpy as np
    import onnxruntime
    import torch

    from export.onnx import export_onnx
    from serving.engine import OnnxEncoder
    from trainer.checkpoint import load_encoder, save_encoder
    from trainer.data import open_collection
    from trainer.sources import open_encoder
    if run.startswith("random:"):  # no trained encoder at hand: a random one of the same shape
        encoder, info = open_encoder(run)
        run = str(Path(out).parent / "encoder.safetensors")
        save_encoder(run, encoder, arch=info["arch"], stem=info["stem"], embedding_dim=info["embedding_dim"],
                     preprocessing=info["preprocessing"])
    path = Path(out).parent / "model.onnx"
    report = export_onnx(run, path, input_kind="uint8", overwrite=True)
    encoder, info = load_encoder(run)
    pre = info["preprocessing"]
    test = open_collection(str(Path(data) / "test.zip"))
    pixels = np.stack([pre(test.load(i)) for i in range(min(64, len(test)))])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        x = pre.normalize_tensor(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device))
        want = encoder.to(device).float()(x).float().cpu().numpy()
    result = {"torch_device": str(device), "onnxruntime": onnxruntime.__version__,
              "available_providers": onnxruntime.get_available_providers(), "export_seconds": report.get("seconds")}
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and device.type == "cuda":
        model = OnnxEncoder(path, device="cuda")  # raises if CUDA did not start (no silent CPU fallback)
    else:
        model = OnnxEncoder(path, device="cpu")
        result["note"] = ("onnxruntime-gpu is not installed here: the CUDA parity is not measured; this is the CPU "
                          "provider's output against PyTorch on " + str(device))
    got = model.embed_pixels(pixels, normalize=False)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    result.update({"providers": model.providers, "images": len(pixels),
                   "max_abs_diff": float(np.abs(got - want).max()), "max_abs_reference": float(np.abs(want).max()),
                   "min_cosine": float(cos.min())})
    Path(out).write_text(json.dumps(result, indent=2))
    return 0 if result["min_cosine"] > 0.999 else 1


def check_onnx_parity(part: Part, data: Path, work: Path, timeout: float) -> dict:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
               if part.doc.get("environment", {}).get("modules", {}).get(m, "?") is None]
    if missing:
        return {"status": "skipped", "note": f"{', '.join(missing)} not installed here"}
    out = work / "onnx" / "parity.json"
    out.parent.mkdir(exist_ok=True)
    trained = work / "c10-knn" / "encoder.safetensors"
    source = str(trained.parent) if trained.is_file() else "random:resnet18:small:32"  # the CIFAR figure did not run
    try:
        sh(part, [*PY, Path(__file__), "--onnx-parity-child", source, data, out], timeout)
    except CheckFailed:
        if not out.is_file():
            raise
        raise CheckFailed(f"embeddings differ: {out.read_text()}") from None
    return json.loads(out.read_text())


def part_figures(part: Part, data: Path, work: Path) -> None:
    if not part.check("environment", 5, lambda t: check_environment(part, t)):
        return
    for key, need, cap, fn in (
            ("resnet50_224_phases", 40, 150, lambda t: check_phases(part, work, False, t)),
            ("resnet50_224_phases_compiled", 150, 200, lambda t: check_phases(part, work, True, t)),
            ("resnet50_224_trainer_memory", 35, 120, lambda t: check_trainer_r50(part, work, "memory", t)),
            ("resnet50_224_trainer_stream", 35, 120, lambda t: check_trainer_r50(part, work, "stream", t)),
            ("cifar10_resnet18_knn_vs_time", 130, 260, lambda t: check_cifar_knn(part, data, work, t)),
            ("onnx_parity", 30, 120, lambda t: check_onnx_parity(part, data, work, t))):
        if part.tiny and key == "resnet50_224_phases_compiled":
            part.doc["checks"][key] = {"status": "skipped", "note": "--tiny: torch.compile takes minutes on a CPU"}
            part.write()
            continue
        part.check(key, need, fn, cap)
    phases = part.doc["checks"].get("resnet50_224_phases", {})
    compiled = part.doc["checks"].get("resnet50_224_phases_compiled", {})
    if phases.get("status") == compiled.get("status") == "ok":
        part.doc["compile_speedup"] = round(compiled["images_per_s"] / phases["images_per_s"], 3)


# ============================================================================================
# Preparing the data folder
# ============================================================================================
def prepare(source: Path, dest: Path, per_class: dict) -> dict:
    """The first `per_class[split]` images of each class of CIFAR-10's zips, copied as they are."""
    dest.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, count in per_class.items():
        src = source / f"{split}.zip"
        if not src.is_file():
            raise SystemExit(f"error: {src} not found (pass --cifar-dir, the folder holding train.zip and test.zip)")
        taken: dict[str, int] = {}
        tmp = dest / f".{split}.zip.tmp"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
            for info in sorted(zin.infolist(), key=lambda i: i.filename):
                if info.is_dir() or "/" not in info.filename:
                    continue
                cls = info.filename.split("/", 1)[0]
                if taken.get(cls, 0) < count:
                    zout.writestr(info.filename, zin.read(info))
                    taken[cls] = taken.get(cls, 0) + 1
        os.replace(tmp, dest / f"{split}.zip")
        sizes[split] = {"images": sum(taken.values()), "classes": len(taken),
                        "bytes": (dest / f"{split}.zip").stat().st_size}
    total = sum(s["bytes"] for s in sizes.values())
    (dest / "MANIFEST.json").write_text(json.dumps({"source": str(source), "per_class": per_class, **sizes,
                                                    "total_bytes": total}, indent=2) + "\n")
    print(f"wrote {dest}: {json.dumps(sizes)}; {total / 2**20:.1f} MiB in all", file=sys.stderr)
    return sizes


# ============================================================================================
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_oneshot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("smoke", "figures", "all"), help="which part to run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")),
                   help="folder for the JSON and log files (default: $OUT, else .)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the CIFAR-10 subset (default {DEFAULT_DATA})")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds a part may spend starting checks (default {BUDGET_S})")
    p.add_argument("--tiny", action="store_true", help="both parts on the CPU in seconds (the test suite's rehearsal)")
    p.add_argument("--prepare", action="store_true", help="write --data from --cifar-dir (run where ../shared is)")
    p.add_argument("--cifar-dir", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10",
                   help="CIFAR-10's train.zip and test.zip for --prepare (default ../shared/data/cifar10)")
    p.add_argument("--collectives-child", metavar="DEVICE", help=argparse.SUPPRESS)
    p.add_argument("--onnx-parity-child", nargs=3, metavar=("RUN", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.collectives_child:
        return collectives_child(args.collectives_child)
    if args.onnx_parity_child:
        return onnx_parity_child(*args.onnx_parity_child)
    if args.prepare:
        prepare(args.cifar_dir, args.data, PER_CLASS)
        return 0
    if args.part is None:
        p.error("choose --part smoke, figures or all (or --prepare)")
    for split in ("train", "test"):
        if not (args.data / f"{split}.zip").is_file():
            print(f"error: {args.data / f'{split}.zip'} is missing: run `python benchmarks/gpu_oneshot.py --prepare` "
                  "where ../shared is, and carry benchmarks/data with the tree", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    ok = True
    with tempfile.TemporaryDirectory(prefix="byolkit-oneshot-") as tmp:
        work = Path(tmp)
        for name in (("smoke", "figures") if args.part == "all" else (args.part,)):
            budget = args.budget_s or (600 if args.tiny else BUDGET_S[name])
            part = Part(name, args.out, budget, args.tiny, device)
            (part_smoke if name == "smoke" else part_figures)(part, args.data.resolve(), work)
            ok = part.finish() and ok
            part.log(f"[{name}] {'passed' if part.doc['passed'] else 'FAILED'} in {part.doc['elapsed_s']}s: "
                     f"{part.path}")
            if name == "smoke" and not ok:
                break
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
