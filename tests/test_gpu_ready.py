"""The multi-GPU fixes, each reproduced on the CPU: collectives on the process's device, one device's
RNG state, ONNX Runtime providers that fall back silently, unreadable batches, the checkpoint clock,
the kNN monitor's bounded sample, cached normalisation statistics, deferred detection losses."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
from PIL import Image

from trainer import checkpoint as ckpt_io
from trainer import distributed as D

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "cpu-quick", "--set", "data.workers=0", "--set", "model.projector_hidden_dim=32",
         "--set", "model.predictor_hidden_dim=32", "--set", "run.precision=fp32", "--no-progress"]


def cli(*flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.pretrain", *map(str, flags)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# -- 1, 2: collectives ---------------------------------------------------------------------------
@pytest.fixture
def gloo_group(tmp_path):
    """A real gloo process group of one process (what torchrun --nproc_per_node 1 gives)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield D.Dist(0, 1, 0, torch.device("cpu"), enabled=True)
    torch.distributed.destroy_process_group()


def test_collectives_hand_the_backend_tensors_on_the_process_device(gloo_group, monkeypatch):
    seen = []
    real = torch.distributed.all_reduce

    def recording(t, op=torch.distributed.ReduceOp.SUM, **kw):
        seen.append(t.device)
        if t.device.type == "meta":  # NCCL-like: the backend gets the process's device; nothing to add up
            return None
        return real(t, op=op, **kw)

    monkeypatch.setattr(torch.distributed, "all_reduce", recording)
    d = gloo_group
    x = torch.tensor([1.0, 4.0])
    assert D.all_reduce(x, d).tolist() == [1.0, 4.0] and D.all_reduce(x, d, "max").tolist() == [1.0, 4.0]
    assert D.all_reduce_mean(x, d).tolist() == [1.0, 4.0]
    assert D.all_gather_objects({"a": 1}, d) == [{"a": 1}]
    assert seen == [torch.device("cpu")] * 3
    # a process whose device is not the CPU (a GPU under NCCL): a CPU tensor handed in goes there first
    gpu_like = D.Dist(0, 1, 0, torch.device("meta"), enabled=True)
    out = D.all_reduce(torch.ones(3, dtype=torch.int64), gpu_like)
    assert seen[-1] == torch.device("meta") and out.device.type == "meta"
    assert x.tolist() == [1.0, 4.0]  # the input is never modified


def test_time_budget_agrees_through_the_helper(gloo_group, monkeypatch):
    import trainer.pretrain as P
    from trainer.pretrain import TimeBudget
    calls = []
    def spy(t, d, op="sum"):
        calls.append((t.device, d, op))
        return D.all_reduce(t, d, op)
    monkeypatch.setattr(P, "all_reduce", spy)
    budget = TimeBudget(1000, start_step=0)
    budget.start()
    total = 0
    for done in range(1, TimeBudget.LAST + 1):
        total = budget.after_step(done, 10_000, gloo_group)
    assert calls and calls[0][1] is gloo_group and calls[0][2] == "max" and total > TimeBudget.LAST


def test_no_collective_bypasses_the_helper():
    """The CPU-tensor-to-NCCL class of bug: every collective goes through trainer/distributed.py."""
    pattern = re.compile(r"torch\.distributed\.(all_reduce|all_gather|all_gather_object|broadcast|reduce|"
                         r"reduce_scatter|gather|scatter|barrier)\(")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for folder in ("trainer", "export", "serving", "app")
                 for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "distributed.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


# -- 3: RNG state of this process's device only -----------------------------------------------------
def _index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else FakeCuda.current


class FakeCuda:
    """Two visible GPUs when the checkpoint is written, one when it is resumed."""
    current, visible = 1, 2

    def __init__(self):
        self.generators = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
        self.restored = {}

    def get(self, device="cuda"):
        return self.generators[_index(device)]

    def set(self, state, device="cuda"):
        index = _index(device)
        if index >= FakeCuda.visible:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.restored[index] = state

    def set_all(self, states):
        for i, state in enumerate(states):
            self.set(state, i)


def test_rng_state_is_the_current_device_only(monkeypatch):
    fake = FakeCuda()
    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "current_device": lambda: FakeCuda.current, "device_count": lambda: FakeCuda.visible,
                        "get_rng_state": fake.get, "set_rng_state": fake.set,
                        "get_rng_state_all": lambda: [fake.generators[0], fake.generators[1]],
                        "set_rng_state_all": fake.set_all}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    FakeCuda.current, FakeCuda.visible = 1, 2
    state = ckpt_io.rng_state()  # written by the process on GPU 1 of two
    assert torch.equal(state["cuda"], fake.generators[1])
    FakeCuda.current, FakeCuda.visible = 0, 1  # resumed by a process with one GPU
    ckpt_io.set_rng_state(state)
    assert list(fake.restored) == [0] and torch.equal(fake.restored[0], fake.generators[1])
    # a checkpoint of the old format (every device's state): this device's entry only
    fake.restored.clear()
    ckpt_io.set_rng_state({**state, "cuda": [fake.generators[0], fake.generators[1]]})
    assert list(fake.restored) == [0] and torch.equal(fake.restored[0], fake.generators[0])


# -- 5: ONNX Runtime providers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    path = tmp_path_factory.mktemp("onnx") / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_provider_that_did_not_start_is_an_error(tiny_onnx, monkeypatch):
    """ONNX Runtime only warns when it cannot start CUDA and runs on the CPU instead."""
    from serving import engine
    monkeypatch.setattr(engine, "onnx_providers", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(engine.ModelError, match="could not start CUDAExecutionProvider"):
        engine.OnnxEncoder(tiny_onnx, device="cuda")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import export_speed
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        with pytest.raises(engine.ModelError, match=f"could not start {provider}"):
            export_speed.ort_session(tiny_onnx, 1, provider)
    assert export_speed.ort_session(tiny_onnx, 1).get_providers() == ["CPUExecutionProvider"]


# -- 6: unreadable batches ----------------------------------------------------------------------------
def test_fill_batch_never_leaves_a_batch_of_one():
    from trainer.data import fill_batch
    one = torch.arange(1).view(1, 1)
    assert fill_batch(None, 4) is None and fill_batch(one[:0], 4) is None
    assert fill_batch(one, 4).flatten().tolist() == [0, 0, 0, 0]
    three = torch.arange(3).view(3, 1)
    assert fill_batch(three, 4).flatten().tolist() == [0, 1, 2, 0] and fill_batch(three, 3) is three


def test_prefetch_passes_batches_through_on_the_cpu():
    from trainer.data import prefetch_to_device
    items = [(torch.ones(2), 0), (None, 3), (torch.zeros(1), 1)]
    assert list(prefetch_to_device(iter(items), torch.device("cpu"))) == items


def test_steps_of_unreadable_images_still_count(tmp_path):
    """Stream pipeline, 2 readable images among 16: whole batches are unreadable, others hold one image."""
    data = tmp_path / "mostly-broken"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    for i in range(14):
        (data / f"broken{i:02d}.png").write_bytes(b"\x89PNG not really" * (i + 1))
    out = tmp_path / "run"
    proc = cli(*SMALL, "--batch-size", 4, "--data", data, "--out", out, "--max-steps", 8,
               "--set", "data.pipeline=stream", "--set", "run.log_every=1")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == summary["total_steps"] == 8
    assert summary["empty_steps"] >= 4  # at least two of each epoch's four batches hold no readable image
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 28 and all(np.isfinite(r["loss"]) for r in rows)


# -- 7: checkpoints by time, not at every epoch end ----------------------------------------------------
def test_checkpoint_clock():
    from trainer.pretrain import CheckpointClock
    now = [0.0]
    clock = CheckpointClock(every_steps=0, every_s=60, clock=lambda: now[0])
    now[0] = 59.0
    assert not clock.due(3)
    now[0] = 61.0
    assert clock.due(4)
    clock.saved(0.5)
    assert not clock.due(5) and clock.count == 1 and clock.seconds == 0.5
    steps = CheckpointClock(every_steps=10, every_s=0, clock=lambda: now[0])
    now[0] = 1e9
    assert [s for s in range(1, 31) if steps.due(s)] == [10, 20, 30]


def test_short_epochs_do_not_checkpoint_each_time(image_folder, tmp_path):
    """18 images, batch 6: an epoch every 3 steps. One checkpoint for the stop, one at the end."""
    out = tmp_path / "run"
    flags = [*SMALL, "--batch-size", 6, "--data", image_folder, "--out", out, "--max-steps", 12,
             "--set", "run.checkpoint_every=0", "--set", "run.checkpoint_every_s=3600"]
    proc = cli(*flags, "--stop-after-steps", 5)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoints"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    proc = cli(*flags, "--resume")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["checkpoints"] == 1


# -- 7: the kNN monitor: a bounded sample ----------------------------------------------------------------
def test_knn_monitor_decodes_a_bounded_sample(image_folder):
    from trainer.config import preset
    from trainer.data import open_collection
    from trainer.pretrain import KnnMonitor
    cfg = preset("cpu-quick")
    cfg.data.workers, cfg.run.knn_max_images = 0, 5
    pre = cfg.data.preprocessing()
    monitor = KnnMonitor(open_collection(str(image_folder)), None, None, str(image_folder), pre, cfg,
                         torch.device("cpu"), progress=False)
    assert len(monitor.train_images) == len(monitor.train_labels) == 5 and len(monitor.val_images) == 5
    images = torch.zeros(18, 3, 24, 24, dtype=torch.uint8)  # the memory pipeline's: indexed, not decoded
    labels = torch.arange(18) % 3
    monitor = KnnMonitor(open_collection(str(image_folder)), images, labels, str(image_folder), pre, cfg,
                         torch.device("cpu"), progress=False)
    assert len(monitor.train_images) == 5 and set(monitor.train_labels.tolist()) <= {0, 1, 2}
    assert 0 <= monitor.run(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 4)))["top1"] <= 1


# -- 7: no host-to-device copy of the normalisation statistics per call -----------------------------------
def test_normalisation_statistics_are_made_once_per_device(monkeypatch):
    from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocessing, _channel_stats
    _channel_stats.cache_clear()
    pre = Preprocessing.for_image_size(8, CIFAR10_MEAN, CIFAR10_STD)
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = pre.normalize_tensor(batch)
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: made.append(a) or _real(*a, **k))
    for _ in range(3):
        torch.testing.assert_close(pre.normalize_tensor(batch), want)
    assert made == []
    expected = (batch.float() / 255 - torch.Tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.Tensor(CIFAR10_STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(want, expected)


# -- 7: detection reads its losses one interval late ---------------------------------------------------------
def test_detection_loss_check_reads_the_deferred_record():
    from trainer.finetune.detect import TrainingError, _check_losses
    from trainer.pretrain import DeferredMetrics

    class Bar:
        postfix = None

        def set_postfix(self, **kw):
            self.postfix = kw

    logged, bar = DeferredMetrics(), Bar()
    logged.push({"step": 20}, loss=torch.tensor(1.5), nonfinite=torch.tensor(0.0))
    _check_losses(logged.pop(), 0.02, bar, D.Dist(), epoch=0)
    assert bar.postfix == {"loss": "1.500", "epoch": 1}
    logged.push({"step": 40}, loss=torch.tensor(float("nan")), nonfinite=torch.tensor(1.0))
    with pytest.raises(TrainingError, match="non-finite by step 40"):
        _check_losses(logged.pop(), 0.02, bar, D.Dist(), epoch=1)
