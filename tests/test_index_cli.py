"""`python -m app.index`: build, add, search and info over real image folders and zips, with the
stand-in ONNX encoder (tests/app_util.py); bad input gives one `error:` line and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from app_util import make_colour_model
from conftest import CLASS_COLOURS, GOOD_IN_DIRTY, PER_CLASS, REPO_ROOT

from app.faiss_index import SearchIndex
from app.index import main

N_LABELLED = PER_CLASS * len(CLASS_COLOURS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_colour_model(root / "colour.onnx", seed=0), make_colour_model(root / "other.onnx", seed=1)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_build_search_add_info(tmp_path, capsys, models, image_folder, flat_folder):
    model, _ = models
    out = tmp_path / "ix"
    code, stdout, err = run(capsys, "build", "--images", image_folder, "--out", out, "--model", model, "--no-progress")
    assert code == 0, err
    assert f"indexed {N_LABELLED} images" in stdout and "flat index, exact search" in stdout
    index = SearchIndex.load(out)
    assert len(index) == N_LABELLED and index.model["fingerprint"] == "colour0000000000"
    assert sorted({it["label"] for it in index.items}) == sorted(CLASS_COLOURS)
    assert index.sources == [{"kind": "folder", "path": str(image_folder.resolve())}]

    # search: the query's own class fills the top of the list (the stand-in embeds mean colour)
    query = image_folder / "green" / "img_03.jpg"
    code, stdout, err = run(capsys, "search", "--index", out, "--image", query, "-k", "4", "--model", model)
    assert code == 0, err
    rows = stdout.strip().splitlines()[1:]
    assert len(rows) == 4
    assert rows[0].split()[1] == "1.0000" and rows[0].endswith(str(query))
    assert all(row.split()[2] == "green" for row in rows)
    code, stdout, _ = run(capsys, "search", "--index", out, "--image", query, "-k", "3", "--model", model, "--json")
    hits = json.loads(stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["label"] == "green" and hits[0]["score"] > 0.999

    # add: new images are appended, those already in the index are not embedded twice
    code, stdout, err = run(capsys, "add", "--index", out, "--images", flat_folder, "--model", model, "--no-progress")
    assert code == 0, err
    assert "added 6 images" in stdout and f"holds {N_LABELLED + 6} images" in stdout
    code, stdout, _ = run(capsys, "add", "--index", out, "--images", flat_folder, "--model", model, "--no-progress")
    assert "added 0 images, 6 already in the index" in stdout
    again = SearchIndex.load(out)
    assert len(again) == N_LABELLED + 6 and len(again.sources) == 2
    assert again.items[-1]["label"] is None  # a flat folder has no classes

    code, stdout, _ = run(capsys, "info", "--index", out)
    info = json.loads(stdout)
    assert code == 0 and info["count"] == N_LABELLED + 6 and info["kind"] == "flat"
    assert info["model"]["fingerprint"] == "colour0000000000"


def test_build_from_zip_with_approximate_index(tmp_path, capsys, models, image_zip):
    model, _ = models
    out = tmp_path / "ixz"
    code, stdout, err = run(capsys, "build", "--images", image_zip, "--out", out, "--model", model,
                            "--index-type", "hnsw", "--no-progress")
    assert code == 0, err
    assert "hnsw index" in stdout and "too few images to measure recall" in stdout
    index = SearchIndex.load(out)
    assert index.kind == "hnsw" and index.sources[0]["kind"] == "zip"
    assert index.image_path(0).startswith(f"{image_zip.resolve()}:")
    assert index.load_image(0).size == (44, 36)  # read back from inside the archive


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys, models, dirty_folder):
    model, _ = models
    out = tmp_path / "ixd"
    code, stdout, err = run(capsys, "build", "--images", dirty_folder, "--out", out, "--model", model, "--no-progress")
    assert code == 0, err
    assert f"indexed {GOOD_IN_DIRTY} images" in stdout and "(2 unreadable skipped)" in stdout
    assert "skipped corrupt.jpg" in err and "skipped notes.jpg" in err
    index = SearchIndex.load(out)
    assert index.skipped == 2 and sorted(u["name"] for u in index.unreadable) == ["corrupt.jpg", "notes.jpg"]
    # adding the same folder again tries them again without counting them twice
    run(capsys, "add", "--index", out, "--images", dirty_folder, "--model", model, "--no-progress")
    assert SearchIndex.load(out).skipped == 2


def test_fingerprint_guard(tmp_path, capsys, models, image_folder, flat_folder):
    model, other = models
    out = tmp_path / "ix"
    assert run(capsys, "build", "--images", image_folder, "--out", out, "--model", model, "--no-progress")[0] == 0
    before = (out / "index.json").read_text()
    code, _, err = run(capsys, "add", "--index", out, "--images", flat_folder, "--model", other, "--no-progress")
    assert_error(code, err, "fingerprint colour0000000000", "fingerprint colour0000000001", "cannot be compared")
    code, _, err = run(capsys, "search", "--index", out, "--image", flat_folder / "photo_0.png", "--model", other)
    assert_error(code, err, "fingerprint colour0000000000")
    assert (out / "index.json").read_text() == before  # untouched


def test_bad_input(tmp_path, capsys, models, image_folder, empty_folder, dirty_folder):
    model, _ = models
    out = tmp_path / "ix"
    assert run(capsys, "build", "--images", image_folder, "--out", out, "--model", model, "--no-progress")[0] == 0
    cases = [
        (["build", "--images", tmp_path / "nowhere", "--out", tmp_path / "a", "--model", model], ["does not exist"]),
        (["build", "--images", empty_folder, "--out", tmp_path / "b", "--model", model], ["no images found"]),
        (["build", "--images", image_folder, "--out", out, "--model", model], ["already holds an index", "--force"]),
        (["build", "--images", image_folder, "--out", tmp_path / "c"], ["--model MODEL.onnx or --server URL"]),
        (["build", "--images", image_folder, "--out", tmp_path / "d", "--model", tmp_path / "missing.onnx"],
         ["no ONNX model at"]),
        (["build", "--images", image_folder, "--out", tmp_path / "e", "--model", image_folder / "red" / "img_00.png"],
         ["not a loadable ONNX model"]),
        (["build", "--images", image_folder, "--out", tmp_path / "f", "--model", model, "--index-type", "lsh"],
         ["invalid choice: 'lsh'"]),
        (["search", "--index", tmp_path / "none", "--image", image_folder / "red" / "img_00.png", "--model", model],
         ["no index at"]),
        (["search", "--index", out, "--image", dirty_folder / "notes.jpg", "--model", model], ["not a readable image"]),
        (["search", "--index", out, "--image", tmp_path / "no.png", "--model", model], ["no image file at"]),
        (["search", "--index", out, "--image", image_folder / "red" / "img_00.png", "--model", model, "-k", "0"],
         ["-k must be at least 1"]),
        (["search", "--index", out, "--image", image_folder / "red" / "img_00.png", "--server", "ftp://x"],
         ["unknown scheme"]),
        (["frobnicate"], ["invalid choice"]),
    ]
    for args, needles in cases:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        _, err = capsys.readouterr()
        assert_error(code, err, *needles)
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_help_and_real_process(tmp_path, models, image_folder):
    """The module runs as `python -m app.index`: --help for every command, one real build."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for args in ([], ["build"], ["add"], ["search"], ["info"]):
        proc = subprocess.run([sys.executable, "-m", "app.index", *args, "--help"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "usage: python -m app.index" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "app.index", "build", "--images", str(image_folder), "--out",
                           str(tmp_path / "ix"), "--model", str(models[0])], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and f"indexed {N_LABELLED} images" in proc.stdout, proc.stderr


def test_server_and_in_process_encoders_share_an_index(tmp_path, capsys, models, image_folder):
    """Built through the real server over gRPC, extended over HTTP, searched in process: one model,
    one fingerprint, the same neighbours."""
    from serving_util import ServerProcess
    model, _ = models
    server = ServerProcess(model, tmp_path).start()
    try:
        out = tmp_path / "ix"
        code, stdout, err = run(capsys, "build", "--images", image_folder / "red", "--out", out,
                                "--server", server.grpc_url, "--no-progress")
        assert code == 0, err + server.stderr()[-2000:]
        code, stdout, err = run(capsys, "add", "--index", out, "--images", image_folder / "blue",
                                "--server", server.http_url, "--no-progress")
        assert code == 0 and "added 6 images" in stdout, err
        query = image_folder / "blue" / "img_04.png"
        remote = run(capsys, "search", "--index", out, "--image", query, "-k", "5", "--server", server.grpc_url,
                     "--json")
        local = run(capsys, "search", "--index", out, "--image", query, "-k", "5", "--model", model, "--json")
        assert remote[0] == local[0] == 0, remote[2] + local[2]
        r, lo = json.loads(remote[1]), json.loads(local[1])
        assert [h["path"] for h in r] == [h["path"] for h in lo] and r[0]["path"].endswith("img_04.png")
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(r, lo))
    finally:
        assert server.stop() == 0
