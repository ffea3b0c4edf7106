"""`python -m trainer.depth`: the metrics and losses by hand, joint augmentation, the three data layouts
(NYU's .mat written with h5py here), learning generated scenes, exact resume, torchrun, bad input."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from trainer.finetune import depth
from trainer.synthetic import write_depth_scenes

SIZE = 48
FAST = ["--encoder", "random:resnet18_w16", "--base-size", SIZE, "--crop-size", 40, "--batch-size", 8,
        "--workers", 0, "--no-progress", "--device", "cpu", "--lr", 2e-3]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scenes")
    return {"train": write_depth_scenes(root / "train", 64, SIZE, seed=1),
            "val": write_depth_scenes(root / "val", 12, SIZE, seed=2, depth_format="npy")}


def cli(*flags, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer.depth", *map(str, flags)], capture_output=True, text=True,
                          env=ENV, cwd=REPO_ROOT, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# -- metrics and losses against hand-computed cases ------------------------------------------------
def test_metrics_by_hand():
    g = torch.tensor([[1.0, 2.0], [4.0, 0.5]])
    perfect = depth.depth_metrics(g.clone(), g)
    assert perfect == {"abs_rel": 0, "sq_rel": 0, "rmse": 0, "rmse_log": 0, "log10": 0,
                       "delta1": 1, "delta2": 1, "delta3": 1}
    # a constant factor 1.25: every ratio sits exactly on the first threshold, which is strict (<)
    m = depth.depth_metrics(1.25 * g, g)
    assert m["delta1"] == 0 and m["delta2"] == 1 and m["delta3"] == 1
    assert m["abs_rel"] == pytest.approx(0.25)
    assert m["sq_rel"] == pytest.approx(0.0625 * (1 + 2 + 4 + 0.5) / 4)
    assert m["rmse"] == pytest.approx(0.25 * math.sqrt((1 + 4 + 16 + 0.25) / 4))
    assert m["rmse_log"] == pytest.approx(math.log(1.25))
    assert m["log10"] == pytest.approx(math.log10(1.25))
    # 1.25^2 exactly: now delta2 fails as well
    assert depth.depth_metrics(1.5625 * g, g)["delta2"] == 0
    # masked pixels count for nothing: a zero target and a pixel outside `valid`, both with wild predictions
    g2 = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.5, 3.0]])
    p2 = torch.tensor([[1.25, 2.5, 99.0], [5.0, 0.625, 0.01]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert depth.depth_metrics(p2, g2, valid) == pytest.approx(m)
    # median scaling undoes a global scale
    assert depth.depth_metrics(3 * g, g, median_scaling=True)["abs_rel"] == pytest.approx(0, abs=1e-12)
    assert depth.depth_metrics(g, torch.zeros_like(g)) is None


def test_losses_by_hand():
    target = torch.tensor([[1.0, 2.0, 0.0]])
    pred = torch.tensor([[1.1, 3.0, 50.0]])  # residuals 0.1 and 1.0; the third pixel is invalid
    # c = 0.2 * 1.0; 0.1 <= c counts as is, 1.0 > c as (1 + c^2) / 2c = 2.6
    assert depth.berhu_loss(pred, target).item() == pytest.approx((0.1 + 2.6) / 2)
    # scale-invariant: a global factor k costs mean(d^2) - 0.5 mean(d)^2 = 0.5 log(k)^2
    assert depth.silog_loss(target * 3, target).item() == pytest.approx(0.5 * math.log(3) ** 2, rel=1e-5)
    assert depth.silog_loss(target, target).item() == pytest.approx(0, abs=1e-7)


def test_eigen_crop():
    m = depth.eigen_crop_mask(480, 640)
    assert m.sum() == (471 - 45) * (601 - 41) and m[45, 41] and not m[44, 41] and not m[45, 601]
    assert depth.eigen_crop_mask(240, 320).sum() == (236 - 22) * (300 - 20)


# -- joint augmentation ------------------------------------------------------------------------------
def test_augmentation_keeps_photo_and_depth_aligned():
    """A random block pattern crosses both: white blocks at 1 m, black at 3 m. After scaling, cropping,
    flipping and colour jitter the two still agree pixel for pixel, and depth is divided by the scale."""
    rng = np.random.default_rng(0)
    blocks = rng.random((8, 10)) < 0.5
    pattern = np.kron(blocks, np.ones((8, 8), bool))  # 64 x 80
    photo = Image.fromarray(np.where(pattern[..., None], 255, 0).repeat(3, -1).astype(np.uint8))
    truth = np.where(pattern, 1.0, 3.0).astype(np.float32)
    flipped = 0
    for seed in range(12):
        image, d = depth.augment(photo, truth, np.random.default_rng(seed), base_size=64, crop=(48, 56), max_scale=1.5)
        assert image.shape == (48, 56, 3) and d.shape == (48, 56)
        near, far = np.unique(d)
        assert far / near == pytest.approx(3) and 1 / 1.5 - 1e-6 <= near <= 1  # divided by s in [1, 1.5]
        bright = image.mean(-1) > image.mean()
        agree = (bright == (d == near)).mean()
        assert agree > 0.95, (seed, agree)  # only the blended edges of the bilinear photo may differ
        # the crop position is unknown; flipped or not shows in the first row's block pattern
        flipped += int(bool((d[:, 0] == near).sum() != (d[:, -1] == near).sum()))
    assert flipped  # the pattern's sides differ, so flips happened and stayed aligned


# -- the three layouts -----------------------------------------------------------------------------
CFG = depth.DepthSettings(min_depth=1e-3, max_depth=10.0, depth_scale=1000.0, nyu_depth="depths", split=None,
                          data_root=None)


def write_nyu(path: Path, n: int = 6, w: int = 40, h: int = 30, drop: str | None = None) -> Path:
    """A small file laid out as nyu_depth_v2_labeled.mat: images [N, 3, W, H] uint8, depths [N, W, H] float."""
    import h5py
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    images[:, 2, 7] = (255, 0, 0)  # row 2, column 7: red
    depths = rng.uniform(0.5, 8, (n, h, w)).astype(np.float32)
    depths[:, 2, 7] = 7.5
    with h5py.File(path, "w") as f:
        if drop != "images":
            f["images"] = images.transpose(0, 3, 2, 1)
        if drop != "depths":
            f["depths"] = depths.transpose(0, 2, 1)
        f["rawDepths"] = np.zeros((n, w, h), np.float32)
    return path


def test_folder_list_and_nyu_layouts(scenes, tmp_path):
    import h5py
    from scipy.io import savemat
    png = depth.open_depth_data(str(scenes["train"]), "train", CFG)
    npy = depth.open_depth_data(str(scenes["val"]), "val", CFG)
    assert (png.kind, len(png), npy.kind, len(npy)) == ("folder", 64, "folder", 12)
    photo, d = png.read(3)
    stored = np.asarray(Image.open(scenes["train"] / "depth" / "00003.png")).astype(np.float32) / 1000
    assert photo.size == (SIZE, SIZE) and np.array_equal(d, np.where(stored < 10, stored, 0))
    assert np.array_equal(npy.read(0)[1], np.load(scenes["val"] / "depth" / "00000.npy"))
    assert 1 < png.mean_depth < 10 and png.size == (SIZE, SIZE)

    # the list-file layout: "RGB DEPTH FOCAL" per line, paths relative to the list (a leading / too)
    listing = tmp_path / "train_files.txt"
    listing.write_text("# rgb depth focal\n" + "".join(
        f"/{scenes['train'].name}/rgb/{i:05d}.png {scenes['train'].name}/depth/{i:05d}.png 518.86\n" for i in (4, 9)))
    shutil.copytree(scenes["train"], tmp_path / scenes["train"].name)
    listed = depth.open_depth_data(str(listing), "train", CFG)
    assert listed.kind == "list" and len(listed) == 2 and np.array_equal(listed.read(1)[1], png.read(9)[1])

    # NYU's labelled .mat (HDF5) and the official split file (MATLAB v5, 1-based indices)
    mat = write_nyu(tmp_path / "nyu.mat")
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3], [6]])})
    cfg = dataclasses.replace(CFG, split=str(tmp_path / "splits.mat"))
    train, val = depth.open_depth_data(str(mat), "train", cfg), depth.open_depth_data(str(mat), "val", cfg)
    assert train.rows == [0, 1, 3] and val.rows == [2, 5] and val.names == ["nyu_0003", "nyu_0006"]
    photo, d = val.read(1)
    assert photo.size == (40, 30) and d.shape == (30, 40)
    assert photo.getpixel((7, 2)) == (255, 0, 0) and d[2, 7] == pytest.approx(7.5)
    with h5py.File(mat, "r") as f:
        assert np.array_equal(d, f["depths"][5].T)
    # a v7.3 (HDF5) split file reads the same
    with h5py.File(tmp_path / "splits73.mat", "w") as f:
        f["trainNdxs"], f["testNdxs"] = np.array([[1, 2, 4]]), np.array([[3, 6]])
    assert depth.read_split(tmp_path / "splits73.mat") == {"train": [0, 1, 3], "val": [2, 5]}


# -- learning, outputs, resume, torchrun ---------------------------------------------------------------
def test_learns_scenes_far_beyond_the_mean_depth(scenes, tmp_path):
    out = tmp_path / "run"
    proc = cli(*FAST, "--train", scenes["train"], "--val", scenes["val"], "--out", out, "--epochs", 8,
               "--eval-every", 4, "--draw", 2)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    base, final = metrics["baseline_mean_depth"], metrics["final"]
    assert summary["steps"] == 8 * 8 and summary["abs_rel"] == final["abs_rel"]
    # predicting the training set's mean depth everywhere: abs rel ~0.5, delta1 ~0.3 on these scenes
    assert final["abs_rel"] < 0.5 * base["abs_rel"], (final, base)
    assert final["rmse"] < 0.6 * base["rmse"] and final["delta1"] > base["delta1"] + 0.3
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 9))
    assert [h["epoch"] for h in metrics["history"] if "rmse" in h] == [4, 8]
    assert metrics["eigen_crop"] is False and metrics["median_scaling"] is False
    drawn = sorted((out / "predictions").iterdir())
    assert [p.name for p in drawn] == ["00000.jpg", "00001.jpg"]
    with Image.open(drawn[0]) as im:
        assert im.size[0] == 3 * SIZE + 16 and im.size[1] > SIZE + 20  # three panels, the scale bar below
        picture = np.asarray(im).astype(int)
    photo = np.asarray(Image.open(scenes["val"] / "rgb" / "00000.png")).astype(int)
    assert np.abs(picture[:SIZE, :SIZE] - photo).mean() < 8  # the photo panel is the photo


def test_killed_run_resumes_exactly(scenes, tmp_path):
    flags = [*FAST, "--train", scenes["train"], "--val", scenes["val"], "--epochs", 2, "--eval-every", 0,
             "--draw", 0, "--decoder", "fpn", "--loss", "silog", "--schedule", "cosine"]
    cli(*flags, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.depth", *map(str, flags), "--out", str(killed)],
                            cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] < 2
    proc = cli("--out", killed, "--resume", "--no-progress")
    assert "resumed" in proc.stderr
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    parts = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert whole["step"] == parts["step"] == 16
    for k, v in whole["model"].items():
        assert torch.equal(v, parts["model"][k]), k
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["final"]
    b = json.loads((killed / "metrics.json").read_text())["final"]
    assert all(a[k] == b[k] for k in depth.METRICS)
    # what shapes the model or the data cannot change on resume
    assert _main(["--out", str(killed), "--resume", "--decoder", "upproj"])[0] == 2


def test_torchrun_two_processes_on_cpu(scenes, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.depth",
         *map(str, FAST), "--train", str(scenes["train"]), "--val", str(scenes["val"]), "--out", str(out),
         "--epochs", "1", "--draw", "1"],
        capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1
    summary = json.loads(reports[0])
    assert summary["world_size"] == 2 and summary["steps"] == 8  # 64 samples / global batch 8
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["images"] == 12  # every validation image scored once over the two processes
    assert [p.name for p in (out / "predictions").iterdir()] == ["00000.jpg"]


# -- bad input: one line, exit 2, nothing trained; a photo breaking mid-run is skipped ----------------------
def _main(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = depth.main(list(map(str, argv)))
    return code, err.getvalue()


def _error(tmp_path: Path, train, val, *extra) -> str:
    code, err = _main([*FAST, "--train", train, "--val", val, "--out", tmp_path / "run", "--epochs", 1, *extra])
    assert code == 2, err[-2000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _small_set(tmp_path: Path, name: str) -> Path:
    return write_depth_scenes(tmp_path / name, 4, 24, seed=3)


@pytest.mark.parametrize("case,message", [
    ("no_depth", "have no depth map"),
    ("other_size", "00001.png is 12x12, 00001.png is 24x24"),
    ("eight_bit", "is an 8-bit image (L); expected a 16-bit PNG"),
    ("rgb", "is a RGB image; expected a single-channel 16-bit PNG"),
    ("no_valid", "have no valid pixel"),
    ("nan_npy", "have no valid pixel"),
])
def test_bad_depth_files_are_refused(tmp_path, case, message):
    data = _small_set(tmp_path, "bad")
    target = data / "depth" / "00001.png"
    if case == "no_depth":
        target.unlink()
    elif case == "other_size":
        Image.fromarray(np.full((12, 12), 2000, np.uint16)).save(target)
    elif case == "eight_bit":
        Image.new("L", (24, 24), 20).save(target)
    elif case == "rgb":
        Image.new("RGB", (24, 24), (20, 20, 20)).save(target)
    elif case == "no_valid":  # zeros and values beyond --max-depth only
        Image.fromarray(np.where(np.eye(24) > 0, 0, 60000).astype(np.uint16)).save(target)
    else:
        target.unlink()
        np.save(data / "depth" / "00001.npy", np.full((24, 24), np.nan, np.float32))
    assert message in _error(tmp_path, data, _small_set(tmp_path, "ok"))


def test_bad_nyu_files_are_refused(tmp_path):
    from scipy.io import savemat
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3], [6]])})
    for drop in ("images", "depths"):
        mat = write_nyu(tmp_path / f"no_{drop}.mat", drop=drop)
        assert f"has no variable '{drop}'" in _error(tmp_path, mat, mat, "--split", tmp_path / "splits.mat")
    mat = write_nyu(tmp_path / "nyu.mat")
    assert "--split splits.mat" in _error(tmp_path, mat, mat)
    savemat(tmp_path / "other.mat", {"trainIdx": np.array([[1]])})
    assert "no variable 'trainNdxs'" in _error(tmp_path, mat, mat, "--split", tmp_path / "other.mat")
    savemat(tmp_path / "far.mat", {"trainNdxs": np.array([[1], [9]]), "testNdxs": np.array([[3]])})
    assert "outside 1-6" in _error(tmp_path, mat, mat, "--split", tmp_path / "far.mat")
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    assert "not a MATLAB v7.3 (HDF5) file" in _error(tmp_path, tmp_path / "v5.mat", mat, "--split",
                                                     tmp_path / "splits.mat")


def test_usage_errors(scenes, tmp_path):
    ok = _small_set(tmp_path, "ok")
    assert "missing --val" in _main(["--train", ok, "--encoder", "random:resnet18_w16", "--out", tmp_path / "r"])[1]
    assert "does not exist" in _error(tmp_path, tmp_path / "nowhere", ok)
    assert "expected the folders rgb/ and depth/" in _error(tmp_path, tmp_path, ok)
    assert "do not fill one batch" in _error(tmp_path, ok, ok)
    assert "--crop-size must be HxW" in _error(tmp_path, ok, ok, "--crop-size", "4x5x6")
    assert "unknown architecture" in _error(tmp_path, ok, ok, "--encoder", "random:resnet7")


def test_photo_breaking_mid_run_is_skipped_and_counted(tmp_path, monkeypatch):
    """A photo that passed the up-front check but no longer decodes is skipped and counted, train and val."""
    data = write_depth_scenes(tmp_path / "d", 10, 32, seed=4)
    scan = depth.open_depth_data

    def scan_then_break(spec, split, *a, **k):
        checked = scan(spec, split, *a, **k)
        if split == "train":  # the same folder is --val: break it after both scans
            return checked
        raw = (data / "rgb" / "00002.png").read_bytes()
        (data / "rgb" / "00002.png").write_bytes(raw[: len(raw) // 2])
        return checked

    monkeypatch.setattr(depth, "open_depth_data", scan_then_break)
    code, err = _main([*FAST, "--train", data, "--val", data, "--out", tmp_path / "run", "--epochs", 2,
                       "--batch-size", 4, "--base-size", 32, "--crop-size", 24, "--draw", 0])
    assert code == 0, err[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 8 of the 10 samples are drawn per epoch (2 batches of 4): the broken one once or twice in two epochs
    assert metrics["skipped_unreadable"]["train"] in (1, 2) and "skipped" in err
    assert metrics["final"]["val_unreadable"] == 1 and metrics["final"]["images"] == 9
    # the up-front check itself refuses a photo that is already broken
    assert "not a readable image" in _error(tmp_path / "again", data, data, "--base-size", 32, "--crop-size", 24,
                                            "--batch-size", 4)


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exit_:
        depth.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for phrase in ("berHu", "scale-invariant", "--depth-scale", "--split", "Eigen crop", "--median-scaling",
                   "predictions/*.jpg"):
        assert phrase in text, phrase


# -- the GPU benchmark's CPU mode ------------------------------------------------------------------------------
def test_gpu_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_depth.py", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"byol", "random"}
    for run in result["runs"].values():
        assert 0 <= run["delta1"] <= 1 and run["abs_rel"] > 0 and run["seconds"] > 0


@pytest.mark.parametrize("stem", ["imagenet", "small"])
@pytest.mark.parametrize("decoder", depth.DECODERS)
def test_both_stems_and_decoders_predict_at_input_size(stem, decoder):
    from trainer.models import build_encoder
    encoder, _ = build_encoder("resnet18_w16", stem)
    net = depth.build_model(encoder, decoder, init_depth=3.0).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 40, 56).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 40, 56) and (out > 0).all()
    assert decoder != "upproj" or len(net.decoder.up) == 4  # Laina et al.'s four up-projection blocks
