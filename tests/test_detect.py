"""trainer.detect: Faster/Mask R-CNN fine-tuning on generated shapes, COCO metrics against hand-computed
cases, exact resume, and every kind of bad input refused up front (or a counted skip)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.finetune import detect
from trainer.finetune.common import freeze_batchnorm, prepare_resnet, stage_channels
from trainer.models import build_encoder
from trainer.optim import warmup_multistep
from trainer.synthetic import write_shapes_coco

# A narrow ResNet-18 on 64 px shapes, with anchors scaled down to match: about 30 CPU-seconds for 8 epochs.
FAST = ["--min-size", "64", "--max-size", "64", "--anchor-sizes", "8,16,32,64,128", "--head-size", "128",
        "--rois-per-image", "64", "--workers", "0", "--warmup-steps", "10", "--no-progress", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are too small to share out: on a busy 2-core machine two threads spin-wait on
    each other (the learning test took 140 CPU-seconds with two, 20 with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = write_shapes_coco(root / "train", 64, 64, seed=0, masks=False)
    val = write_shapes_coco(root / "val", 24, 64, seed=1, masks=False)
    return train, val


@pytest.fixture(scope="module")
def mask_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask_shapes")
    return write_shapes_coco(root / "train", 16, 64, seed=2), write_shapes_coco(root / "val", 8, 64, seed=3)


def data_args(train, val):
    return ["--train-images", str(train[0]), "--train-ann", str(train[1]),
            "--val-images", str(val[0]), "--val-ann", str(val[1])]


# -- learning ----------------------------------------------------------------------------------
def test_faster_rcnn_learns_shapes(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    rc = detect.main(["--encoder", "random:resnet18_w16", *data_args(*shapes), "--out", str(out),
                      "--epochs", "8", "--lr", "0.01", "--draw", "3", *FAST])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["task"] == "faster_rcnn"
    assert metrics["bbox"]["AP50"] == summary["bbox_AP50"]
    # three solid colour-coded shapes on noise: a detector that learned anything finds most of them
    assert summary["bbox_AP50"] > 0.4, summary
    assert 0 < summary["bbox_mAP"] <= summary["bbox_AP50"]
    losses = [e["loss"] for e in metrics["epochs"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    drawn = sorted(p.name for p in (out / "predictions").iterdir())
    assert drawn == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_mask_rcnn_when_annotations_carry_masks(mask_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    rc = detect.main(["--encoder", "random:resnet18_w16", *data_args(*mask_shapes), "--out", str(out),
                      "--epochs", "1", "--draw", "1", *FAST])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "mask_rcnn"
    assert {"bbox_mAP", "bbox_AP50", "segm_mAP", "segm_AP50"} <= set(summary)
    assert (out / "predictions" / "00000.jpg").is_file()
    # --no-masks trains boxes only on the same files
    rc = detect.main(["--encoder", "random:resnet18_w16", *data_args(*mask_shapes), "--out", str(tmp_path / "b"),
                      "--epochs", "1", "--draw", "0", "--no-masks", *FAST])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "faster_rcnn"


def test_resume_is_exact(mask_shapes, tmp_path, capsys):
    """Stopped mid-epoch and resumed == uninterrupted: same weights, bit for bit (masks, flips, RPN sampling)."""
    args = ["--encoder", "random:resnet18_w16", *data_args(*mask_shapes), "--epochs", "2", "--draw", "0",
            "--batch-size", "4", *FAST[:-2]]
    assert detect.main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert detect.main([*args, "--out", str(tmp_path / "cut"), "--stop-after-steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"stopped_at_step": 3, "total_steps": 8}
    # a second start without --resume is refused; a resume may not change the schedule
    assert detect.main([*args, "--out", str(tmp_path / "cut")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert detect.main(["--out", str(tmp_path / "cut"), "--resume", "--lr", "0.5"]) == 2
    assert "cannot change --lr" in capsys.readouterr().err
    assert detect.main(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert ma["bbox"] == mb["bbox"] and ma["segm"] == mb["segm"]


# -- metrics against hand-computed cases ----------------------------------------------------------
GT = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
      "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                      {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0}]}


def result(image_id, box, score, cat=7):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def test_metrics_perfect_and_empty():
    perfect = [result(1, [10, 10, 40, 40], 0.9), result(2, [50, 50, 30, 30], 0.8)]
    assert detect.coco_metrics(GT, perfect) == pytest.approx({"mAP": 1.0, "AP50": 1.0, "AP75": 1.0})
    assert detect.coco_metrics(GT, []) == {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    # the right boxes under the wrong class score nothing
    assert detect.coco_metrics(GT, [{**r, "category_id": 9} for r in perfect])["AP50"] == 0.0


def test_metrics_iou_thresholds():
    # one object, found by a 40x40 box shifted 8 px: IoU = 32*40 / (2*1600 - 32*40) = 1280/1920 = 0.667,
    # a hit at the IoU thresholds 0.50, 0.55, 0.60 and 0.65 (AP 1 each), a miss at 0.70-0.95 (AP 0):
    # AP50 = 1, AP75 = 0, mAP = 4/10
    gt = {**GT, "annotations": GT["annotations"][:1], "images": GT["images"][:1]}
    metrics = detect.coco_metrics(gt, [result(1, [18, 10, 40, 40], 0.9)])
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    assert metrics["mAP"] == pytest.approx(0.4)


def test_metrics_precision_recall_curve():
    # ranked: hit (image 1), false alarm (image 2), hit (image 2) -> precision 1 up to recall 0.5, then 2/3.
    # COCO's 101-point interpolation: 51 recall points at 1.0 and 50 at 2/3.
    results = [result(1, [10, 10, 40, 40], 0.9), result(2, [0, 0, 20, 20], 0.8), result(2, [50, 50, 30, 30], 0.7)]
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    metrics = detect.coco_metrics(GT, results)
    assert metrics["AP50"] == pytest.approx(expected) and metrics["mAP"] == pytest.approx(expected)
    # the same false alarm ranked last costs nothing: precision is 1 at every recall reached before it
    results[1]["score"] = 0.1
    assert detect.coco_metrics(GT, results)["AP50"] == pytest.approx(1.0)


def test_to_coco_results_maps_labels_and_boxes():
    out = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([2]), "masks": torch.zeros(1, 1, 100, 100)}
    out["masks"][0, 0, 20:80, 10:50] = 0.9
    rec = detect.to_coco_results(out, 4, [0, 7, 9])[0]
    assert rec["category_id"] == 9 and rec["bbox"] == [10.0, 20.0, 40.0, 60.0] and rec["image_id"] == 4
    from pycocotools import mask as mask_utils
    assert mask_utils.area(rec["segmentation"]) == 40 * 60


# -- the backbone -----------------------------------------------------------------------------
def test_backbone_norm_and_trainable_layers():
    from torchvision.ops import FrozenBatchNorm2d
    enc, _ = build_encoder("resnet18_w16")
    assert stage_channels(enc) == [16, 32, 64, 128]
    enc.bn1.running_mean.fill_(0.25)
    prepare_resnet(enc, 2, "frozen")
    assert isinstance(enc.bn1, FrozenBatchNorm2d) and torch.all(enc.bn1.running_mean == 0.25)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    trained = {n.split(".")[0] for n, p in enc.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4"}
    enc50, _ = build_encoder("resnet50")
    assert stage_channels(enc50) == [256, 512, 1024, 2048]
    prepare_resnet(enc50, 5, "bn")
    assert all(p.requires_grad for p in enc50.parameters())
    assert isinstance(freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0], FrozenBatchNorm2d)


def test_schedule_warmup_and_steps():
    lr = warmup_multistep(0.1, 90, 10)
    assert lr[0] == pytest.approx(1e-4) and lr[10] == pytest.approx(0.1) and lr[59] == pytest.approx(0.1)
    assert lr[60] == pytest.approx(0.01) and lr[80] == pytest.approx(0.001)


# -- bad input ----------------------------------------------------------------------------------
def broken_copy(src, tmp_path, edit):
    """A copy of a generated split whose annotation JSON has been changed by `edit(data)`."""
    img_dir, ann = src
    dst = tmp_path / "broken"
    shutil.copytree(img_dir, dst / "images")
    data = json.loads(Path(ann).read_text())
    edit(data)
    (dst / "instances.json").write_text(json.dumps(data))
    return dst / "images", dst / "instances.json"


def run_bad(train, val, tmp_path, capsys, extra=()):
    rc = detect.main(["--encoder", "random:resnet18_w16", *data_args(train, val), "--out", str(tmp_path / "run"),
                      "--epochs", "1", *FAST, *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["annotations"][0].update(image_id=999), "names image id 999, which is not in 'images'"),
    (lambda d: d["images"][0].update(file_name="gone.png"), "image 'gone.png' (id 1) is not in"),
    (lambda d: d.update(annotations=[]), "holds no annotations"),
    (lambda d: d["annotations"][0].update(category_id=4), "has category_id 4, which is not among the 3 categories"),
    (lambda d: d["images"][0].update(width=65), "is 64x64 but the annotations say 65x64"),
    (lambda d: d.pop("categories"), "is not a COCO instances file"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2]), "has no bbox"),
    (lambda d: [a.update(bbox=[0, 0, 0, 5]) for a in d["annotations"]], "none of the"),
])
def test_bad_annotations_are_refused_up_front(shapes, tmp_path, capsys, edit, message):
    train = broken_copy(shapes[0], tmp_path, edit)
    rc, err = run_bad(train, shapes[1], tmp_path, capsys)
    assert rc == 2 and message in err and err.startswith("error: --train-ann"), err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_masks_are_refused(mask_shapes, tmp_path, capsys):
    def wrong_size_rle(d):
        d["annotations"][0]["segmentation"] = {"size": [32, 64], "counts": "0"}
    rc, err = run_bad(broken_copy(mask_shapes[0], tmp_path, wrong_size_rle), mask_shapes[1], tmp_path, capsys)
    assert rc == 2 and "the mask of annotation 1 is 64x32 but its image 00000.png is 64x64" in err, err

    def some_without_masks(d):
        del d["annotations"][1]["segmentation"]
    shutil.rmtree(tmp_path / "broken")
    rc, err = run_bad(broken_copy(mask_shapes[0], tmp_path, some_without_masks), mask_shapes[1], tmp_path, capsys)
    assert rc == 2 and "carry a segmentation" in err and "--no-masks" in err, err


def test_val_categories_must_be_known(shapes, tmp_path, capsys):
    def extra_category(d):
        d["categories"].append({"id": 42, "name": "new"})
        d["annotations"][0]["category_id"] = 42
    rc, err = run_bad(shapes[0], broken_copy(shapes[1], tmp_path, extra_category), tmp_path, capsys)
    assert rc == 2 and "category ids the training annotations lack: [42]" in err, err


def test_corrupt_image_is_refused(shapes, tmp_path, capsys):
    train = broken_copy(shapes[0], tmp_path, lambda d: None)
    (train[0] / "00003.png").write_bytes(b"not a png at all")
    rc, err = run_bad(train, shapes[1], tmp_path, capsys)
    assert rc == 2 and "00003.png is not a readable image" in err, err


def test_bad_boxes_are_clipped_or_skipped_and_counted(shapes, tmp_path):
    def edit(d):
        d["annotations"][0]["bbox"] = [-5, -5, 20, 20]           # sticks out: clipped to [0, 0, 15, 15]
        d["annotations"][1]["bbox"] = [10, 10, 0, 8]             # no area: skipped
        d["annotations"][2]["bbox"] = [70, 10, 8, 8]             # wholly outside the 64 px image: skipped
    train = broken_copy(shapes[0], tmp_path, edit)
    coco = detect.load_coco(*train)
    assert (coco.clipped, coco.skipped) == (1, 2)
    assert coco.skipped_reasons == {"no area": 1, "outside the image": 1}
    assert coco.boxes[0][0].tolist() == [0.0, 0.0, 15.0, 15.0]
    total = len(json.loads(Path(shapes[0][1]).read_text())["annotations"])
    assert sum(len(b) for b in coco.boxes) == total - 2


def test_image_that_breaks_mid_run_is_skipped(shapes, tmp_path):
    """An image that passed the up-front check but fails to decode later is a counted skip, not a crash."""
    train = broken_copy(shapes[0], tmp_path, lambda d: None)
    coco = detect.load_coco(*train)
    path = Path(coco.images[5]["path"])
    path.write_bytes(path.read_bytes()[:60])  # truncated after the header was read
    ds = detect.DetectionDataset(coco, {c["id"]: k + 1 for k, c in enumerate(coco.categories)})
    items, skipped = detect.collate([ds[4], ds[5], ds[6]])
    assert skipped == 1 and len(items) == 2


def test_usage_errors(shapes, tmp_path, capsys):
    rc, err = run_bad(*shapes, tmp_path, capsys, extra=["--anchor-sizes", "8,16"])
    assert rc == 2 and "five positive sizes" in err
    rc = detect.main(["--out", str(tmp_path / "x"), "--encoder", "random:resnet18_w16"])
    assert rc == 2 and "--train-images is required" in capsys.readouterr().err
    rc, err = run_bad(*shapes, tmp_path, capsys, extra=["--encoder", str(tmp_path / "nope")])
    assert rc == 2 and "no encoder or checkpoint" in err


def test_gpu_detect_script_runs_tiny_on_cpu(tmp_path):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_detect.py", "--tiny", "--out", str(tmp_path / "runs"),
                           "--json", str(out)], capture_output=True, check=False, text=True, cwd=root, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["detection"]
    assert result["random"]["encoder"].startswith("random:") and result["byol"]["encoder"].endswith(".safetensors")
    # same architecture, different weights: the random side really is re-initialised
    assert result["byol"]["fingerprint"] != result["random"]["fingerprint"]
    for side in ("byol", "random"):
        assert 0.0 <= result[side]["mAP"] <= result[side]["AP50"] <= 1.0
        assert len(result[side]["epoch_losses"]) == 1


def test_torchrun_two_cpu_processes(shapes, tmp_path):
    """DDP over gloo: the batch split over two processes, evaluation gathered, one summary from rank 0."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.detect",
           "--encoder", "random:resnet18_w16", *data_args(*shapes), "--epochs", "1", "--draw", "1", *FAST]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, check=False, text=True, cwd=root,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["steps"] == 8  # 64 images, global batch 8: 4 per process, 8 steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["val_images"] == 24 and 0.0 <= metrics["bbox"]["AP50"] <= 1.0
    assert (out / "predictions" / "00000.jpg").is_file()
    # torch has no CPU SyncBatchNorm: refused up front, not mid-run
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "sync"), "--norm", "sync"], capture_output=True, check=False,
                          text=True,
                          cwd=root, timeout=300, env=env)
    assert proc.returncode != 0 and "--norm sync needs CUDA processes" in proc.stderr


def test_drawing_keeps_confident_boxes_with_readable_labels_and_ground_truth(shapes, tmp_path, monkeypatch):
    """Only predictions at or above --draw-score are drawn, each caption on a filled box of its colour;
    the ground truth is drawn as well, in white."""
    import numpy as np
    from PIL import Image

    from trainer.finetune.common import GROUND_TRUTH_COLOUR, palette
    coco = detect.load_coco(*shapes[1], name="val")
    gt = coco.boxes[0]
    fake = {"boxes": torch.tensor([[4.0, 30.0, 40.0, 60.0], [20.0, 20.0, 50.0, 50.0]]),
            "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 2])}
    monkeypatch.setattr(detect, "predict", lambda *a, **k: iter([(0, fake)]))
    seen = {}
    real = detect.draw_predictions
    monkeypatch.setattr(detect, "draw_predictions", lambda *a, **k: seen.update(k) or real(*a, **k))
    detect._draw(None, coco, ["background", "square", "disk", "triangle"], tmp_path, 1, 0.5, "cpu")
    assert seen["labels"] == ["square 0.90"] and seen["boxes"].tolist() == [[4.0, 30.0, 40.0, 60.0]]
    assert seen["ground_truth"].tolist() == gt.tolist()
    drawn = np.asarray(Image.open(tmp_path / "00000.jpg")).astype(int)
    x0, y0, x1, y1 = gt[0].round().astype(int).tolist()
    edge = drawn[y0:y1 + 1, x0] if y1 > y0 else drawn[y0, x0:x1 + 1]
    assert (np.abs(edge - GROUND_TRUTH_COLOUR).sum(-1) < 90).mean() > 0.5  # a white outline
    colour = np.array(palette(4)[1])
    label = drawn[20:29, 5:30]  # the caption's filled box sits above the predicted box (top 30)
    assert (np.abs(label - colour).sum(-1) < 90).mean() > 0.4
