"""`python -m trainer.segment`: learning on generated shapes, the metrics by hand, dilation, resume,
bad input, prediction images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO_ROOT
from PIL import Image

from trainer.finetune import segment
from trainer.models import build_encoder
from trainer.runtime import open_run
from trainer.settings import from_dict

# sparse ids on purpose (as COCO panoptic's); 0 is the ignore index and also named in the file
CLASSES = {"ignore_index": 0, "classes": {"0": "unlabeled", "3": "background", "7": "square", "12": "disc"}}
SIZE = (72, 60)  # width, height: not square


def make_shapes(root: Path, count: int, seed: int, size=SIZE, unmasked: int = 0) -> tuple[Path, Path]:
    """Photos of a reddish square and a bluish disc on grey noise, with their masks (1 px ignored rim
    around each shape); `unmasked` extra photos have no mask."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count + unmasked):
        photo = rng.integers(70, 150, size=(h, w, 3)).astype(np.int16)
        mask = np.full((h, w), 3, np.uint8)
        s = int(rng.integers(14, 24))
        x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        square = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
        r = int(rng.integers(7, 12))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        disc = dist <= r
        photo[square] += np.array([90, -40, -40], np.int16)
        photo[disc] += np.array([-40, -30, 90], np.int16)
        mask[square] = 7
        mask[disc] = 12
        mask[(np.abs(dist - r) < 0.7)] = 0
        Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(images / f"s{i:03d}.jpg", quality=92)
        if i < count:
            Image.fromarray(mask).save(masks / f"s{i:03d}.png")
    return images, masks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shapes")
    train_images, train_masks = make_shapes(root / "train", 48, seed=1, unmasked=3)
    val_images, val_masks = make_shapes(root / "val", 12, seed=2)
    classes = root / "classes.json"
    classes.write_text(json.dumps(CLASSES))
    return {"train_images": train_images, "train_masks": train_masks, "val_images": val_images,
            "val_masks": val_masks, "classes": classes, "root": root}


def data_flags(d: dict) -> list:
    return ["--train-images", d["train_images"], "--train-masks", d["train_masks"], "--val-images",
            d["val_images"], "--val-masks", d["val_masks"], "--classes", d["classes"]]


FAST = ["--encoder", "random:resnet18_w16", "--head", "fcn", "--base-size", "60", "--crop-size", "56",
        "--batch-size", "8", "--workers", "0", "--no-progress", "--device", "cpu"]


def cli(*flags, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.segment", *map(str, flags)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# -- learning, outputs -------------------------------------------------------------------------
def test_learns_shapes_and_writes_everything(shapes, tmp_path):
    out = tmp_path / "run"
    proc = cli(*FAST, *data_flags(shapes), "--out", out, "--epochs", 12, "--lr", 0.05, "--eval-every", 6,
               "--draw", 3)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 12 and summary["steps"] == 12 * 6 and not summary["stopped"]
    # chance is ~1/3 per class; predicting all background scores ~0.27 mIoU here
    assert summary["mean_iou"] > 0.6, summary
    assert summary["pixel_accuracy"] > 0.85
    assert "skipped photos without a mask: 3 train, 0 val" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["background", "square", "disc"] and metrics["ignore_index"] == 0
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 13))
    assert [h["epoch"] for h in metrics["history"] if "mean_iou" in h] == [6, 12]
    assert metrics["final"]["mean_iou"] == summary["mean_iou"]
    assert set(metrics["final"]["iou"]) == {"background", "square", "disc"}
    assert metrics["skipped_without_mask"] == {"train": 3, "val": 0}
    drawn = sorted((out / "predictions").iterdir())
    assert [p.name for p in drawn] == ["s000.jpg", "s001.jpg", "s002.jpg"]
    with Image.open(drawn[0]) as im:
        # prediction | gap | ground truth, and a legend underneath
        assert im.size[0] == 2 * SIZE[0] + 8 and im.size[1] > SIZE[1]
        arr = np.asarray(im).astype(int)
    photo = np.asarray(Image.open(shapes["val_images"] / "s000.jpg")).astype(int)
    # the ground-truth panel is the photo with colour blended in: differs from the photo
    assert np.abs(arr[:SIZE[1], SIZE[0] + 8:] - photo).mean() > 10
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 12 and ckpt["config"]["task"] == "segment"


def test_killed_run_resumes_exactly(shapes, tmp_path):
    """SIGKILL after the first epoch's checkpoint; --resume ends with the uninterrupted run's weights."""
    import signal
    import time
    flags = [*FAST, *data_flags(shapes), "--epochs", 2, "--eval-every", 0, "--draw", 0, "--head", "deeplabv3"]
    cli(*flags, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.segment", *map(str, flags), "--out", str(killed)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] < 2
    proc = cli("--out", killed, "--resume", "--no-progress")
    assert "resumed" in proc.stderr
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    parts = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert whole["step"] == parts["step"] == 12
    for k, v in whole["model"].items():
        assert torch.equal(v, parts["model"][k]), k
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["final"]
    b = json.loads((killed / "metrics.json").read_text())["final"]
    assert a["mean_iou"] == b["mean_iou"] and a["pixel_accuracy"] == b["pixel_accuracy"]
    # settings that shape the model or the data cannot change on resume
    assert segment.main(["--out", str(killed), "--resume", "--head", "fcn"]) == 2


def test_stop_mid_epoch_resumes_exactly(shapes, tmp_path, monkeypatch):
    """SIGINT inside an epoch: checkpoint at that batch; the resumed run ends where the whole one does."""
    common = {"encoder": "random:resnet18_w16", "head": "fcn", "epochs": 2, "batch_size": 8, "lr": 0.02,
              "weight_decay": 1e-4, "base_size": 60, "crop_size": 56, "device": "cpu", "workers": 0, "seed": 5,
              "draw": 0, "eval_every": 0, "task": "segment"}
    cfg = {**common, **{k: str(shapes[k]) for k in segment.DATA_FLAGS},
           "classes": segment.Classes.load(shapes["classes"]).to_dict(), "classes_file": str(shapes["classes"])}
    segment.train(segment.SegmentSettings(**cfg), tmp_path / "whole", progress=False)

    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def step_then_stop(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # inside epoch 1 (6 steps per epoch)
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step_then_stop)
    summary = segment.train(segment.SegmentSettings(**cfg), tmp_path / "parts", progress=False)
    monkeypatch.undo()
    assert summary["stopped"] and summary["steps"] == 4
    state = open_run(tmp_path / "parts", resume=True, kind="segment")
    assert state["epoch"] == 0 and state["position"] == 32
    segment.train(from_dict(segment.SegmentSettings, state["config"]), tmp_path / "parts", state, progress=False)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["model"]
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k


def test_torchrun_two_processes_on_cpu(shapes, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.segment",
         *map(str, [*FAST, *data_flags(shapes)]), "--out", str(out), "--epochs", "2", "--draw", "2"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # the main process reports
    summary = json.loads(reports[0])
    assert summary["world_size"] == 2 and summary["steps"] == 12  # 48 pairs / global batch 8, twice
    final = json.loads((out / "metrics.json").read_text())["final"]
    labelled = sum(int((np.asarray(Image.open(m)) != 0).sum()) for m in shapes["val_masks"].iterdir())
    assert final["labelled_pixels"] == labelled  # every validation image scored once over the two processes
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["s000.jpg", "s001.jpg"]


# -- metrics against hand-computed cases --------------------------------------------------------
def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, -1, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = segment.confusion_matrix(target, pred, 4)
    # rows = truth, columns = prediction; the two ignored pixels (-1) are not counted
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    s = segment.segmentation_scores(cm, ["a", "b", "c", "d"])
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    # IoU a = 1 / (2 + 2 - 1) = 1/3; b = 2 / (2 + 3 - 2) = 2/3; c = 1 / (2 + 1 - 1) = 1/2; d absent: left out
    assert s["iou"] == {"a": pytest.approx(1 / 3, abs=1e-6), "b": pytest.approx(2 / 3, abs=1e-6),
                        "c": pytest.approx(0.5, abs=1e-6), "d": None}
    assert s["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["classes_scored"] == 3 and s["labelled_pixels"] == 6


def test_class_only_predicted_counts_with_iou_zero():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    s = segment.segmentation_scores(segment.confusion_matrix(target, pred, 3), ["a", "b", "c"])
    assert s["iou"] == {"a": 0.5, "b": 0.0, "c": None}
    assert s["mean_iou"] == pytest.approx(0.25) and s["pixel_accuracy"] == 0.5


def test_classes_file_maps_sparse_ids_and_ignore(tmp_path):
    c = segment.Classes.load(_write(tmp_path / "c.json", CLASSES))
    assert c.ids == [3, 7, 12] and c.names == ["background", "square", "disc"] and c.ignore_index == 0
    raw = np.array([[0, 3, 7], [12, 3, 0]])
    assert c.map(raw).tolist() == [[-1, 0, 1], [2, 0, -1]]
    assert c.map(np.array([5, 255, 4000])).tolist() == [-2, -2, -2]  # unknown ids (refused up front)
    listed = segment.Classes.load(_write(tmp_path / "l.json", ["sky", "road", "car"]), ignore_index=255)
    assert listed.ids == [0, 1, 2] and listed.map(np.array([255, 2])).tolist() == [-1, 2]


# -- the dilated backbone -----------------------------------------------------------------------
def test_dilation_matches_torchvision_for_bottlenecks():
    """A ResNet-50 converted after construction computes what torchvision builds dilated."""
    torch.manual_seed(0)
    converted, _ = build_encoder("resnet50")
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(converted.state_dict())
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    segment.dilate_resnet(converted)
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
    for (name, a), (_, b) in zip(converted.named_modules(), reference.named_modules()):
        if isinstance(a, torch.nn.Conv2d):
            assert (a.stride, a.dilation, a.padding) == (b.stride, b.dilation, b.padding), name
    x = torch.randn(1, 3, 64, 64)
    features = torchvision.models._utils.IntermediateLayerGetter(converted.eval(), {"layer4": "out"})
    expected = torchvision.models._utils.IntermediateLayerGetter(reference.eval(), {"layer4": "out"})
    with torch.no_grad():
        torch.testing.assert_close(features(x)["out"], expected(x)["out"])


@pytest.mark.parametrize("arch,stem,stride", [("resnet18_w16", "imagenet", 8), ("resnet18", "imagenet", 8),
                                              ("resnet18_w16", "small", 2)])
def test_dilated_basic_block_resnets_keep_weights_and_output_stride(arch, stem, stride):
    net, _ = build_encoder(arch, stem)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    segment.dilate_resnet(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    features = torchvision.models._utils.IntermediateLayerGetter(net.eval(), {"layer3": "l3", "layer4": "l4"})
    with torch.no_grad():
        out = features(torch.randn(1, 3, 64, 96))
    assert out["l4"].shape[-2:] == out["l3"].shape[-2:] == (64 // stride, 96 // stride)
    # layer4's blocks: the first at dilation 2 (layer3's), the second at 4, as torchvision lays them out
    assert net.layer4[0].conv1.dilation == (2, 2) and net.layer4[1].conv2.dilation == (4, 4)
    assert net.layer3[0].conv1.stride == (1, 1) and net.layer3[0].downsample[0].stride == (1, 1)


# -- bad input ------------------------------------------------------------------------------------
def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _copy_tree(shapes: dict, tmp_path: Path) -> dict:
    import shutil
    d = {}
    for key in segment.DATA_FLAGS:
        d[key] = tmp_path / key
        shutil.copytree(shapes[key], d[key])
    d["classes"] = shapes["classes"]
    return d


def _error(d: dict, tmp_path: Path, *extra) -> str:
    """main() in this process (the command line's path, minus the interpreter start): exit code 2,
    one line on stderr, nothing trained."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = segment.main(list(map(str, [*FAST, *data_flags(d), "--out", tmp_path / "run", "--epochs", 1, *extra])))
    assert code == 2, err.getvalue()[-2000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_mask_of_other_size_is_refused(shapes, tmp_path):
    d = _copy_tree(shapes, tmp_path)
    Image.new("L", (30, 20), 3).save(d["val_masks"] / "s004.png")
    msg = _error(d, tmp_path)
    assert "differ in size" in msg and "s004.png is 30x20, s004.jpg is 72x60" in msg


def test_unknown_class_ids_are_refused(shapes, tmp_path):
    d = _copy_tree(shapes, tmp_path)
    m = np.asarray(Image.open(d["train_masks"] / "s002.png")).copy()
    m[0, :3] = 9
    Image.fromarray(m).save(d["train_masks"] / "s002.png")
    msg = _error(d, tmp_path)
    assert "s002.png: [9]" in msg and "ignore index: 0" in msg


def test_mask_naming_a_missing_photo_is_refused(shapes, tmp_path):
    d = _copy_tree(shapes, tmp_path)
    (d["train_images"] / "s005.jpg").unlink()
    msg = _error(d, tmp_path)
    assert "name no photo" in msg and "s005.png" in msg


def test_empty_and_unusable_inputs_are_refused(shapes, tmp_path):
    d = _copy_tree(shapes, tmp_path)
    for p in d["val_masks"].iterdir():
        p.unlink()
    assert "no masks (.png)" in _error(d, tmp_path)

    d = _copy_tree(shapes, tmp_path / "rgb")
    Image.new("RGB", SIZE).save(d["train_masks"] / "s001.png")
    assert "must be single-channel" in _error(d, tmp_path / "rgb")

    d = {**shapes, "classes": _write(tmp_path / "one.json", {"classes": {"1": "only"}})}
    assert "need at least 2" in _error(d, tmp_path / "one")
    d = {**shapes, "classes": tmp_path / "missing.json"}
    assert "cannot read the classes file" in _error(d, tmp_path / "missing")
    assert "must be at least 2" in _error(shapes, tmp_path / "bs", "--batch-size", "1")
    assert "do not fill one batch" in _error(shapes, tmp_path / "big", "--batch-size", "64")
    assert "unknown architecture" in _error(shapes, tmp_path / "enc", "--encoder", "random:resnet7")


# -- the GPU benchmark's CPU mode -------------------------------------------------------------------
def test_gpu_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_segment.py", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"byol", "random"}
    for run in result["runs"].values():
        assert 0 <= run["mean_iou"] <= 1 and 0 <= run["pixel_accuracy"] <= 1 and run["seconds"] > 0
