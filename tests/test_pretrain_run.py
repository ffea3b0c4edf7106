"""End-to-end runs of `python -m trainer.pretrain`: outputs, a killed run resumed, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "cpu-quick", "--batch-size", "8", "--set", "data.workers=0",
         "--set", "model.projector_hidden_dim=64", "--set", "model.predictor_hidden_dim=64",
         "--set", "run.precision=fp32", "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two colour-coded classes of 40x48 noise images, PNG."""
    root = tmp_path_factory.mktemp("pretrain-images")
    rng = np.random.default_rng(0)
    for c, channel in (("red", 0), ("blue", 2)):
        (root / c).mkdir()
        for i in range(24):
            arr = (rng.random((40, 48, 3)) * 120).astype(np.uint8)
            arr[..., channel] += 120
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def cli(*flags, check=True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.pretrain", *map(str, flags)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600, check=False, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_directory_holds_everything(images, tmp_path):
    out = tmp_path / "run"
    proc = cli(*SMALL, "--data", images, "--val-data", images, "--out", out, "--max-steps", 6,
               "--set", "run.log_every=2")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["world_size"] == 1
    assert 0 <= summary["knn_top1"] <= 1
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "encoder.safetensors", "summary.json",
            "tensorboard"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and 0 <= r["loss"] <= 8 for r in steps)  # two terms, each in [0, 4]
    assert steps[0]["tau"] < steps[-1]["tau"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["projector_hidden_dim"] == 64 and config["preset"] == "cpu-quick"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and "target_encoder.conv1.weight" in ckpt["model"]


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_killed_run_resumes_to_the_uninterrupted_result(images, tmp_path, pipeline):
    flags = [*SMALL, "--data", images, "--max-steps", 24, "--seed", 3, "--set", "run.checkpoint_every=1",
             "--set", f"data.pipeline={pipeline}"]
    cli(*flags, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.pretrain", *map(str, flags), "--out", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    step = 0
    while step < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
    proc.kill()  # SIGKILL: no chance to clean up, only the atomic checkpoints survive
    proc.wait()
    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < 24, "the run was not interrupted mid-way"

    cli(*flags, "--out", killed, "--resume")
    whole, resumed = load_file(tmp_path / "whole" / "encoder.safetensors"), load_file(killed / "encoder.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 24


def test_time_budget_fits_the_step_count(images, tmp_path):
    out = tmp_path / "budget"
    proc = cli(*SMALL, "--data", images, "--out", out, "--epochs", 10000, "--time-budget", "4s")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    config = json.loads((out / "config.json").read_text())
    assert 12 < summary["steps"] == summary["total_steps"] == config["optim"]["max_steps"] < 10000 * 6
    assert "time budget" in proc.stderr


def test_torchrun_two_processes_on_cpu(images, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainer.pretrain", *map(str, SMALL), "--data", str(images), "--out", str(out),
         "--max-steps", "4", "--set", "run.log_every=2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (out / "encoder.safetensors").is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_deferred_metrics_reads_device_scalars_one_interval_later(device):
    from trainer.pretrain import DeferredMetrics, _projection_std
    logged = DeferredMetrics()
    assert logged.pop() is None
    z = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 5.0]], device=device)
    logged.push({"step": 10, "lr": 0.5}, loss=torch.tensor(1.25, device=device), projection_std=_projection_std(z))
    with pytest.raises(RuntimeError, match="one record at a time"):
        logged.push({"step": 20}, loss=torch.tensor(0.0))  # one record in flight at a time
    record = logged.pop()
    want_std = torch.nn.functional.normalize(z.cpu(), dim=1).std(0).mean().item()
    assert record == {"step": 10, "lr": 0.5, "loss": 1.25, "projection_std": pytest.approx(want_std)}
    assert logged.pop() is None


def test_profile_switch_writes_a_trace(images, tmp_path):
    trace_dir = tmp_path / "trace"
    cli(*SMALL, "--data", images, "--out", tmp_path / "run", "--max-steps", 10, "--profile", trace_dir)
    traces = list(trace_dir.glob("*.pt.trace.json*"))
    assert len(traces) == 1
    text = traces[0].read_text()
    assert "ProfilerStep#" in text and "aten::convolution" in text  # the training steps, recorded


def test_time_budget_refits_when_the_speed_changes():
    """Slow first steps (kernels being made) and a slower stretch later: the step count is refitted
    from the recent speed, so the run ends at its budget, not a sixth short (or past it)."""
    from trainer.distributed import Dist
    from trainer.pretrain import TimeBudget
    clock = [0.0]

    class Simulated(TimeBudget):
        def elapsed(self):
            return clock[0]

    budget, total, done = Simulated(180, start_step=0), 100_000, 0
    budget.start()
    while done < total:
        done += 1
        clock[0] += 1.0 if done <= 10 else 0.1 if done < 800 else 0.15
        total = budget.after_step(done, total, Dist(0, 1, 0, torch.device("cpu"), enabled=False))
    assert 179 <= clock[0] <= 180.5 and done == total
    # never longer than the configured run, however fast the steps
    budget, done = Simulated(180, start_step=0), 0
    clock[0] = 0.0
    budget.start()
    for done in range(1, 150):
        clock[0] += 0.001
        assert budget.after_step(done, 150, Dist(0, 1, 0, torch.device("cpu"), enabled=False)) == 150


def test_eval_size_is_the_saved_encoders_input(images, tmp_path):
    """data.eval_size: the encoder trains on image_size views and is saved for inference at eval_size."""
    from trainer.checkpoint import load_encoder
    out = tmp_path / "fixres"
    cli(*SMALL, "--data", images, "--out", out, "--max-steps", 2, "--set", "data.eval_size=32")
    encoder, info = load_encoder(out / "encoder.safetensors")
    assert info["preprocessing"].input_size == 32 and info["preprocessing"].resize_size == 32
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["image_size"] == 24 and config["data"]["eval_size"] == 32
    with torch.no_grad():
        assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, info["embedding_dim"])
