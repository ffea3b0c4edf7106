"""One writer at a time on an index (app/faiss_index.py index_lock, SearchIndex.writing): two
processes adding at once lose nothing, a busy index is one clear line (or a wait), the app never
writes a stale copy over a newer one, crash leftovers go, and a hand-edited manifest is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from app_util import make_colour_model
from conftest import REPO_ROOT, image_bytes, make_image

from app import ui
from app.embedding import open_encoder
from app.faiss_index import LOCK_NAME, SearchIndex, SearchIndexError, index_lock
from app.index import main
from app.ops import build_index

TRIES = 20
PER_ADD = 2

# Each process adds TRIES folders, one `python -m app.index add` (its main()) per folder, both
# starting together; --wait makes the second writer queue behind the first.
WRITER = """
import os, sys, time
from app.index import main
index, model, go, *folders = sys.argv[1:]
while not os.path.exists(go):
    time.sleep(0.005)
for folder in folders:
    code = main(["add", "--index", index, "--images", folder, "--model", model, "--no-progress", "--wait"])
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_colour_model(tmp_path_factory.mktemp("model") / "colour.onnx")


def tiny_folder(root, n: int, seed: int):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"im{i}.png").write_bytes(image_bytes(make_image((seed * 37 % 256, i * 90, 120), seed * 10 + i,
                                                                 size=(8, 8)), "PNG"))
    return root


def data_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_two_processes_adding_at_once_lose_nothing(tmp_path, model):
    index_dir = tmp_path / "ix"
    encoder = open_encoder(str(model))
    build_index(encoder, tiny_folder(tmp_path / "base", PER_ADD, 999), index_dir, progress=False)
    folders = [[tiny_folder(tmp_path / f"p{p}" / f"t{t}", PER_ADD, p * TRIES + t) for t in range(TRIES)]
               for p in range(2)]
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(index_dir), str(model), str(go), *map(str, fs)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fs in folders]
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    added = [line for out, _ in outputs for line in out.splitlines() if line.startswith("added ")]
    assert len(added) == 2 * TRIES and all(line.startswith(f"added {PER_ADD} images") for line in added)

    index = SearchIndex.load(index_dir)
    assert len(index) == PER_ADD * (2 * TRIES + 1)  # nothing lost
    per_source = {}
    for item in index.items:
        per_source.setdefault(item["source"], []).append(item["name"])
    assert len(index.sources) == 2 * TRIES + 1 and all(sorted(v) == ["im0.png", "im1.png"]
                                                        for v in per_source.values())
    g = index.generation
    assert data_files(index_dir) == sorted(["index.json", LOCK_NAME, f"index-{g}.faiss", f"items-{g}.jsonl",
                                            f"vectors-{g}.npy"])  # nothing damaged, nothing left over
    # every vector is its image's: each image finds itself first
    first = index.image_path(len(index) - 1)
    assert index.neighbours(encoder.embed([first])[0], 1)[0]["id"] == len(index) - 1


def test_a_busy_index_is_one_line_or_a_wait(tmp_path, model, capsys):
    index_dir = tmp_path / "ix"
    encoder = open_encoder(str(model))
    build_index(encoder, tiny_folder(tmp_path / "base", PER_ADD, 1), index_dir, progress=False)
    more = tiny_folder(tmp_path / "more", PER_ADD, 2)
    args = ["add", "--index", str(index_dir), "--images", str(more), "--model", str(model), "--no-progress"]
    acquired, release = threading.Event(), threading.Event()

    def hold():  # another writer (a thread stands in for a process: flock tells them apart too)
        with index_lock(index_dir):
            acquired.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    acquired.wait(10)
    try:
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: another process (pid ") and "--wait" in err[0], err
        assert len(SearchIndex.load(index_dir)) == PER_ADD
        threading.Timer(2.0, release.set).start()
        assert main([*args, "--wait"]) == 0
    finally:
        release.set()
        holder.join()
    out, err = capsys.readouterr()
    assert "waiting for another process" in err and f"added {PER_ADD} images" in out
    assert len(SearchIndex.load(index_dir)) == 2 * PER_ADD


def test_the_app_adds_to_the_newest_index_not_its_stale_copy(tmp_path, model, image_folder, flat_folder, capsys,
                                                              monkeypatch):
    from app_util import set_gradio_env
    set_gradio_env(monkeypatch, tmp_path)
    encoder = open_encoder(str(model))
    index, _ = build_index(encoder, image_folder, tmp_path / "ix", progress=False)
    state = ui.AppState(index, encoder)
    # the command line adds six images while the page is open on the 18 it loaded
    assert main(["add", "--index", str(tmp_path / "ix"), "--images", str(flat_folder), "--model", str(model),
                 "--no-progress"]) == 0
    upload = tmp_path / "upload.png"
    upload.write_bytes(image_bytes(make_image((150, 20, 200), 7), "PNG"))
    status, _ = state.add([str(upload)], "purple")
    assert "the index now holds 25 images" in status, status
    assert len(SearchIndex.load(tmp_path / "ix")) == 25  # 18 + 6 + 1: the command line's six are kept
    # a copy loaded before another writer saved cannot be saved over it
    a, b = SearchIndex.load(tmp_path / "ix"), SearchIndex.load(tmp_path / "ix")
    vector = encoder.embed([str(upload)])
    a.add(vector, [{"source": 0, "name": "x.png"}], model=encoder.model)
    a.save(a.path)
    b.add(vector, [{"source": 0, "name": "y.png"}], model=encoder.model)
    with pytest.raises(SearchIndexError, match="changed by another process"):
        b.save(b.path)
    assert len(SearchIndex.load(tmp_path / "ix")) == 26


def test_leftovers_of_a_crashed_save_go_on_load(tmp_path, model):
    encoder = open_encoder(str(model))
    index_dir = tmp_path / "ix"
    build_index(encoder, tiny_folder(tmp_path / "base", PER_ADD, 3), index_dir, progress=False)
    kept = data_files(index_dir)
    leftovers = ["vectors-7.npy", "index-7.faiss", "items-7.jsonl", ".index.json.abc.tmp"]
    for name in leftovers:
        (index_dir / name).write_bytes(b"half-written")
    (index_dir / "notes.txt").write_text("not ours: kept")
    with index_lock(index_dir):  # a writer at work (this thread): its files would not be stale...
        holder = threading.Thread(target=lambda: SearchIndex.load(index_dir))  # ...for another reader
        holder.start()
        holder.join()
    assert set(leftovers) <= set(data_files(index_dir))
    SearchIndex.load(index_dir)
    assert data_files(index_dir) == sorted([*kept, "notes.txt"])


def test_a_hand_edited_manifest_is_one_line(tmp_path, model, capsys):
    encoder = open_encoder(str(model))
    index_dir = tmp_path / "ix"
    build_index(encoder, tiny_folder(tmp_path / "base", PER_ADD, 4), index_dir, progress=False)
    manifest = json.loads((index_dir / "index.json").read_text())
    edits = {"files": lambda m: m.pop("files"), "index.kind": lambda m: m["index"].pop("kind"),
             "count": lambda m: m.update(count="many"), "files.vectors": lambda m: m["files"].update(
                 vectors="../../etc/passwd"), "skipped": lambda m: m.update(skipped=[1])}
    for needle, edit in edits.items():
        m = json.loads(json.dumps(manifest))
        edit(m)
        (index_dir / "index.json").write_text(json.dumps(m))
        assert main(["info", "--index", str(index_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "edited by hand" in err, err
        assert needle in err or needle == "skipped", err
    np.testing.assert_equal(len(data_files(index_dir)), 5)  # nothing removed on the way
