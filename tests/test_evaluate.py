"""trainer.evaluate: the kNN, linear, semi-supervised and transfer protocols on tiny generated data
whose right answers are known (colour classes, linearly separable features), the labelled-subset
selection, resuming, and the bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLOURS, make_image

from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocessing
from trainer import checkpoint as ckpt_io
from trainer import evaluate, sources
from trainer.models import build_encoder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
SIZE = 24


def _write_split(root: Path, per_class: int, seed0: int, classes=CLASS_COLOURS) -> Path:
    for k, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(colour, seed0 + 100 * k + i).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path]:
    """Three colour classes: 12 training and 4 test images per class (44x36 px, noisy)."""
    root = tmp_path_factory.mktemp("colours")
    return _write_split(root / "train", 12, 0), _write_split(root / "test", 4, 5000)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding an encoder file (resnet18_w16, small stem, 24 px contract)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(1234)  # not the baseline's seed: "trained" and random weights must differ
    encoder, dim = build_encoder("resnet18_w16", "small")
    ckpt_io.save_encoder(root / ckpt_io.ENCODER_NAME, encoder, arch="resnet18_w16", stem="small",
                         embedding_dim=dim, preprocessing=Preprocessing.for_image_size(SIZE, CIFAR10_MEAN, CIFAR10_STD))
    return root


def evaluate_main(capsys, *argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv] + ["--no-progress", "--workers", "0"])  # no decoding processes
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- known answers ---------------------------------------------------------------------------
def test_linear_probe_separates_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g) * 5e-1
    sched = evaluate.Schedule(epochs=20, batch_size=64, lr=0.1)
    r = evaluate.linear_eval_features(x[:300], y[:300], x[300:], y[300:], 4, sched)
    assert r["top1"] == 1.0 and r["train_top1"] == 1.0
    # labels unrelated to the features: the test split cannot beat chance by much
    noise = torch.randint(0, 4, (400,), generator=g)
    r = evaluate.linear_eval_features(x[:300], noise[:300], x[300:], noise[300:], 4, sched)
    assert r["top1"] < 0.45 and r["top5"] == 1.0  # 4 classes: top-5 covers them all


def test_knn_and_fast_linear_on_colour_classes_write_metrics_beside_the_encoder(capsys, colour_data, run_dir):
    train, test = colour_data
    code, out, _ = evaluate_main(capsys, "knn", "--encoder", run_dir, "--train", train, "--test", test)
    assert code == 0 and out.startswith("knn: top-1 100.00%")
    record = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert record["top1"] == 1.0 and record["k"] == 200 and record["num_train"] == 36 and record["num_test"] == 12
    assert record["source"] == "byol" and record["arch"] == "resnet18_w16"

    code, out, _ = evaluate_main(capsys, "linear", "--fast", "--epochs", 30, "--encoder", run_dir,
                                 "--train", train, "--test", test, "--tag", "fast")
    record = json.loads((run_dir / "eval" / "linear-fast.json").read_text())
    assert code == 0 and record["mode"] == "fast" and record["top1"] == 1.0 and record["train_top1"] == 1.0
    assert "linear (fast): top-1 100.00%" in out


def test_random_baseline_writes_beside_the_referenced_encoder_with_its_own_weights(capsys, colour_data, run_dir):
    train, test = colour_data
    code, _, _ = evaluate_main(capsys, "knn", "--encoder", f"random:{run_dir}", "--train", train, "--test", test)
    random_record = json.loads((run_dir / "eval" / "knn-random.json").read_text())
    assert code == 0 and random_record["source"] == "random" and random_record["arch"] == "resnet18_w16"
    trained_fp = ckpt_io.read_encoder_metadata(run_dir / ckpt_io.ENCODER_NAME)["fingerprint"]
    assert random_record["fingerprint"] != trained_fp
    # the baseline is seeded: the same seed is the same network
    assert sources.open_encoder(f"random:{run_dir}", seed=0)[1]["fingerprint"] == random_record["fingerprint"]
    assert sources.open_encoder(f"random:{run_dir}", seed=1)[1]["fingerprint"] != random_record["fingerprint"]


def test_augmented_linear_keeps_the_encoder_frozen_and_learns(colour_data, run_dir):
    train_c, test_c, remap = evaluate.open_labelled(str(colour_data[0]), str(colour_data[1]))
    encoder, info = sources.open_encoder(run_dir)
    pre = info["preprocessing"]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}  # BatchNorm statistics included
    train = evaluate.decode_split(train_c, pre, 0, False, "")
    test = evaluate.decode_split(test_c, pre, 0, False, "", remap)
    model = evaluate.Classifier(encoder, info["embedding_dim"], 3, frozen=True)
    sched = evaluate.Schedule(epochs=8, batch_size=12, lr=0.1)
    r = evaluate.train_classifier(model, train, test, pre, sched, device=torch.device("cpu"))
    assert r["top1"] >= 0.9
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- semi-supervised: the subset and fine-tuning ---------------------------------------------
def test_balanced_subset_takes_the_same_fraction_of_every_class_deterministically():
    labels = [0] * 100 + [1] * 50 + [2] * 30 + [3] * 3
    subset = evaluate.balanced_subset(labels, 0.1, seed=0)
    counts = [sum(labels[i] == c for i in subset) for c in range(4)]
    assert counts == [10, 5, 3, 1]  # at least one image of every class
    assert subset == sorted(subset) and len(set(subset)) == len(subset)
    assert evaluate.balanced_subset(labels, 0.1, seed=0) == subset
    assert evaluate.balanced_subset(labels, 0.1, seed=1) != subset
    assert evaluate.balanced_subset(labels, 1.0, seed=0) == list(range(len(labels)))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(evaluate.UsageError, match=r"\(0, 1\]"):
            evaluate.balanced_subset(labels, bad, seed=0)


def test_semi_fine_tunes_on_a_written_balanced_subset(capsys, colour_data, run_dir, tmp_path):
    train, test = colour_data
    args = ["semi", "--fraction", 0.5, "--epochs", 10, "--batch-size", 6, "--lr", 0.03, "--encoder", run_dir,
            "--train", train, "--test", test]
    code, _, err = evaluate_main(capsys, *args)
    assert code == 0 and "labelled subset: 18 of 36 images" in err
    record = json.loads((run_dir / "eval" / "semi-50pct.json").read_text())
    assert record["num_train"] == 18 and record["top1"] >= 0.9 and record["num_test"] == 12
    subset = json.loads((run_dir / "eval" / "semi-50pct-subset.json").read_text())
    assert subset["per_class"] == {"blue": 6, "green": 6, "red": 6} and subset["count"] == 18
    assert all((train / name).is_file() for name in subset["images"])
    # the same seed picks the same images (into another file)
    code, _, _ = evaluate_main(capsys, *args[:-6], "--epochs", 1, *args[-6:], "--out", tmp_path / "again.json")
    assert json.loads((tmp_path / "again-subset.json").read_text())["images"] == subset["images"]


def test_an_interrupted_fine_tuning_resumes_to_the_uninterrupted_result(capsys, colour_data, tmp_path):
    train, test = colour_data
    args = ["semi", "--fraction", 1, "--epochs", 3, "--batch-size", 12, "--encoder", "random:resnet18_w16:small:24",
            "--train", train, "--test", test]
    assert evaluate_main(capsys, *args, "--out", tmp_path / "whole.json")[0] == 0
    whole = json.loads((tmp_path / "whole.json").read_text())

    part = tmp_path / "part.json"
    code, out, _ = evaluate_main(capsys, *args, "--out", part, "--stop-after", 1)
    assert code == 0 and "--resume" in out and not part.exists() and (tmp_path / "part.ckpt.pt").is_file()
    code, _, err = evaluate_main(capsys, *args[:4], 4, *args[5:], "--out", part, "--resume")  # another schedule
    assert code == 2 and "cannot resume" in err
    saved = (tmp_path / "part.ckpt.pt").read_bytes()
    (tmp_path / "part.ckpt.pt").write_bytes(saved[:len(saved) // 2])  # a crash mid-copy, a full disk
    code, _, err = evaluate_main(capsys, *args, "--out", part, "--resume")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "cannot resume" in errors[0] and "Traceback" not in err, err
    (tmp_path / "part.ckpt.pt").write_bytes(saved)
    code, _, _ = evaluate_main(capsys, *args, "--out", part, "--resume")
    resumed = json.loads(part.read_text())
    assert code == 0 and not (tmp_path / "part.ckpt.pt").exists()
    assert resumed["last_epoch_train_loss"] == pytest.approx(whole["last_epoch_train_loss"], rel=1e-5)
    assert resumed["top1"] == whole["top1"]


def test_transfer_runs_linear_and_fine_tuning(capsys, colour_data, run_dir):
    train, test = colour_data
    code, out, _ = evaluate_main(capsys, "transfer", "--epochs", 4, "--batch-size", 12, "--linear-epochs", 30,
                                 "--encoder", f"random:{run_dir}", "--train", train, "--test", test)
    record = json.loads((run_dir / "eval" / "transfer-colours0-random.json").read_text())
    assert code == 0 and out.startswith("transfer: linear top-1")
    assert record["linear"]["mode"] == "fast" and record["linear"]["top1"] >= 0.9
    assert 0 <= record["finetune"]["top1"] <= 1 and record["finetune"]["schedule"]["epochs"] == 4
    assert not list((run_dir / "eval").glob("*.ckpt.pt"))


# -- bad input: clear messages before any work ------------------------------------------------
def test_bad_inputs_fail_with_one_clear_line_before_work(capsys, colour_data, run_dir, flat_folder, tmp_path):
    train, test = colour_data
    extra = _write_split(tmp_path / "test_extra", 2, 900, {**CLASS_COLOURS, "yellow": (220, 220, 30)})
    out = tmp_path / "m.json"
    base = ["--encoder", run_dir, "--out", out]
    cases = [
        (["knn", *base, "--train", train, "--test", extra], "class(es) that"),
        (["knn", *base, "--train", flat_folder, "--test", test], "has no labels"),
        (["linear", *base, "--train", train, "--test", flat_folder], "has no labels"),
    ]
    not_encoder = tmp_path / "encoder.safetensors"
    not_encoder.write_text("not weights")
    pickle_like = tmp_path / "model.pt"
    pickle_like.write_bytes(b"this is not a torch file")
    cases += [(["knn", "--encoder", p, "--out", out, "--train", train, "--test", test], "not a")
              for p in (not_encoder, pickle_like)]
    cases.append((["knn", "--encoder", "random:resnet18_w16", "--train", train, "--test", test], "--out is required"))
    for argv, message in cases:
        code, stdout, err = evaluate_main(capsys, *argv)
        assert code == 2 and message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not stdout
    for fraction in ("0", "1.5"):
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["semi", "--fraction", fraction, *map(str, base), "--train", str(train), "--test", str(test)])
        assert exc.value.code == 2 and "(0, 1]" in capsys.readouterr().err


def test_cli_help_and_exit_status():
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--help"], capture_output=True, check=False,
                          text=True,
                          cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 0 and all(p in proc.stdout for p in evaluate.PROTOCOLS)
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "semi", "--help"], capture_output=True,
                          check=False,
                          text=True, cwd=ROOT, env=ENV, timeout=120)
    assert "--fraction" in proc.stdout and "random:PATH" in proc.stdout and "--resume" in proc.stdout


# -- the benchmark scripts, tiny --------------------------------------------------------------
def test_benchmark_scripts_run_tiny(colour_data, run_dir, tmp_path):
    train, test = colour_data
    proc = subprocess.run([sys.executable, "benchmarks/gpu_evaluate.py", "--tiny", "--encoder", run_dir, "--train",
                           train, "--test", test, "--out", tmp_path / "gpu.json", "--workers", "0"],
                          capture_output=True, check=False, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["linear"]["mode"] == "augmented" and result["linear"]["schedule"]["epochs"] == 2
    assert result["knn"]["top1"] == 1.0
    proc = subprocess.run([sys.executable, "benchmarks/evaluate_cifar.py", "--encoder", run_dir, "--train", train,
                           "--test", test, "--out", tmp_path / "cifar.json", "--linear-epochs", "5",
                           "--semi-epochs", "1", "--semi-batch", "4", "--fraction", "0.5", "--workers", "0"],
                          capture_output=True, check=False, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "cifar.json").read_text())["rows"]
    assert set(rows) == {"BYOL", "random init"} and rows["BYOL"]["knn"]["top1"] == 1.0
    assert "| BYOL |" in proc.stdout
