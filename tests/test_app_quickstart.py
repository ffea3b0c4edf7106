"""`python -m app`: the main job (train, export, index) and serving an existing index, as real processes.

The training is cut to two steps (--train-steps) so that the whole path, export and its
verification included, runs in well under a minute; a second run reuses everything and only
adds the images that are new, a third asks for more steps and trains the same encoder on. The
page itself is tested in test_app_browser.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from app_util import free_port, gradio_env, make_colour_model
from conftest import CLASS_COLOURS, PER_CLASS, REPO_ROOT, image_bytes, make_image

from app.faiss_index import SearchIndex
from app.sampleset import CREDITS, SAMPLE_ZIP, example_files, read_credits

N = PER_CLASS * len(CLASS_COLOURS)


def env(tmp_path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **gradio_env(tmp_path))


def app(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], cwd=REPO_ROOT, env=env(tmp_path),
                          capture_output=True, text=True, timeout=timeout, check=False)


def summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_main_job_on_own_images(tmp_path, image_folder):
    images = shutil.copytree(image_folder, tmp_path / "pictures")
    work = tmp_path / "work"
    first = summary(app(tmp_path, "--images", images, "--work", work, "--work-exact", "--train-steps", 2,
                        "--no-app", "--no-progress"))
    assert first["count"] == N and first["index"] == str(work / "index")
    assert set(first["precision_at_10"]) == {"random_init", "byol", "pixels", "chance"}
    assert first["training"]["steps"] == 2 and first["training"]["preset"] == "cpu-photos"  # no CUDA here
    for f in ("run/encoder.safetensors", "model.onnx", "index/index.json", "training.png"):
        assert (work / f).is_file(), f
    index = SearchIndex.load(work / "index")
    from export.onnx import read_metadata
    assert index.model["fingerprint"] == read_metadata(work / "model.onnx")["fingerprint"]

    # a second run reuses the encoder, the export and the index, and indexes only what is new
    (images / "red" / "new.png").write_bytes(image_bytes(make_image(CLASS_COLOURS["red"], 500), "PNG"))
    onnx_mtime = (work / "model.onnx").stat().st_mtime_ns
    second = app(tmp_path, "--images", images, "--work", work, "--work-exact", "--train-steps", 2, "--no-app",
                 "--no-progress", "--no-compare")
    assert summary(second)["count"] == N + 1
    assert "reusing the encoder trained before" in second.stderr and "reusing the exported model" in second.stderr
    assert f"added 1 image, {N} already in the index" in second.stderr
    assert (work / "model.onnx").stat().st_mtime_ns == onnx_mtime
    assert "training" not in second.stderr.replace("trained before", "").replace("--train-time trains", "")

    # a third run asks for more: the same encoder trains on from its checkpoint, not from scratch. A marker
    # planted in the checkpoint's weights (a BatchNorm shift of 3) must come through two more small steps
    import torch
    from safetensors.torch import load_file
    checkpoint = work / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["encoder.bn1.bias"] += 3.0
    torch.save(state, checkpoint)
    planted = state["model"]["encoder.bn1.bias"].clone()
    third = app(tmp_path, "--images", images, "--work", work, "--work-exact", "--train-steps", 4, "--no-app",
                "--no-progress")
    result = summary(third)
    assert "continuing the encoder trained before (2 steps" in third.stderr, third.stderr
    assert "extending" in third.stderr and "from step 2" in third.stderr
    assert result["training"]["steps"] == 4
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4], steps  # each run logs its last step (log_every is 10): the count went on from 2
    after = load_file(work / "run" / "encoder.safetensors")["bn1.bias"]
    assert not torch.equal(after, planted) and (after - planted).abs().max() < 0.5  # trained on, from there
    history = [json.loads(line) for line in (work / "run" / "precision.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert read_metadata(work / "model.onnx")["fingerprint"] != index.model["fingerprint"]  # re-exported


def test_main_job_default_images_with_a_given_model(tmp_path):
    """Without --images the shipped photos are indexed; --model skips the training."""
    model = make_colour_model(tmp_path / "colour.onnx")
    result = summary(app(tmp_path, "--model", model, "--work", tmp_path / "work", "--no-app", "--no-progress"))
    assert result["images"] == str(SAMPLE_ZIP) and result["count"] == 1000
    assert result["work"] == str(tmp_path / "work" / "flowers")
    index = SearchIndex.load(result["index"])
    kinds = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert sorted({it["label"] for it in index.items}) == kinds
    assert [p.name.split("_")[0] for p in example_files()] == kinds


def test_shipped_photos_and_their_credits_agree():
    """Every shipped photo has its credit line, and every credit line names a shipped photo."""
    import zipfile
    assert SAMPLE_ZIP.stat().st_size < 8_000_000
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        members = [n for n in zf.namelist() if not n.endswith("/")]
    shipped = members + [f"examples/{p.name}" for p in example_files()]
    credits = read_credits(CREDITS)
    assert sorted(credits) == sorted(shipped) and len(shipped) == len(set(shipped))
    assert all("CC-BY" in line and "flickr.com/" in line for line in credits.values())
    per_kind = {}
    for name in members:
        per_kind[name.split("/")[0]] = per_kind.get(name.split("/")[0], 0) + 1
    assert per_kind == {k: 200 for k in ("daisy", "dandelion", "roses", "sunflowers", "tulips")}
    statement = CREDITS.read_text()
    assert "CC BY 2.0" in statement and "flower_photos" in statement and "resized" in statement


@pytest.mark.parametrize("args, needle", [
    (["--images", "{tmp}/nowhere"], "does not exist"),
    (["--images", "{empty}"], "no images found"),
    (["--index", "{tmp}/ix"], "--index needs the encoder it was built with"),
    (["--index", "{tmp}/ix", "--model", "{tmp}/m.onnx", "--images", "{tmp}"], "--images is for the main job"),
    (["--index", "{tmp}/nothing", "--model", "{model}"], "no index at"),
    (["-k", "0"], "-k must be between 1 and 100"),
    (["--train-time", "soon"], "--train-time: not a duration"),
    (["--model", "a.onnx", "--server", "grpc://x:1"], "either --model or --server"),
])
def test_bad_input(tmp_path, capsys, empty_folder, args, needle):
    from app.__main__ import main
    model = make_colour_model(tmp_path / "colour.onnx")
    args = [a.format(tmp=tmp_path, empty=empty_folder, model=model) for a in args]
    try:
        code = main([*args, "--work", str(tmp_path / "work"), "--no-app"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_an_index(tmp_path, image_folder, sig):
    """python -m app --index ... --model ... serves the page until SIGINT or SIGTERM, even when started
    as a shell's background job (SIGINT inherited as ignored)."""
    model = make_colour_model(tmp_path / "colour.onnx")
    from app.index import main as index_main
    assert index_main(["build", "--images", str(image_folder), "--out", str(tmp_path / "ix"), "--model", str(model),
                       "--no-progress"]) == 0
    help_proc = app(tmp_path, "--help", timeout=60)
    assert help_proc.returncode == 0 and "--index" in help_proc.stdout and "--images" in help_proc.stdout
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the child writes to it until it stops
    proc = subprocess.Popen([sys.executable, "-m", "app", "--index", str(tmp_path / "ix"), "--model", str(model),
                             "--port", str(port)], cwd=REPO_ROOT, env=env(tmp_path), stdout=log,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    try:
        page = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None and "byolkit" in page, (tmp_path / "serve.log").read_text()
        # examples drawn from the index, copied into the app's own folder
        assert list((tmp_path / "gradio").glob("byolkit-app-*/examples/*example_*.png"))
    finally:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    assert "byolkit app: stopped" in (tmp_path / "serve.log").read_text()
    assert not (tmp_path / "ix" / "examples").exists()  # the index directory is left alone
    assert not list((tmp_path / "gradio").glob("byolkit-*"))  # the app's folders go when it stops


def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    from app.__main__ import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: missing the page (gradio): install the app extra, pip install -e '.[app]'"
