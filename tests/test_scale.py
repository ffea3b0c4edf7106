"""Scale out: python -m app.embed on this process and on Ray Data (a local Ray, 2 CPUs), the index
built from its Parquet shards, and the Qdrant backend in local mode, all through the command lines
with the stand-in ONNX encoder (tests/app_util.py) on generated images and WebDataset shards."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from app_util import free_port, make_colour_model
from conftest import CLASS_COLOURS, PER_CLASS, REPO_ROOT, image_bytes, make_image

from app import embed as embed_mod
from app import index as index_cli
from app.embedding import embed_collection, open_encoder
from app.faiss_index import SearchIndex
from trainer.data import open_collection

N = PER_CLASS * len(CLASS_COLOURS)


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_colour_model(root / "colour.onnx", seed=0), make_colour_model(root / "other.onnx", seed=1)


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    """Two tar shards in img2dataset's layout (key.jpg, key.json, key.txt, key.cls); the second
    holds a corrupt JPEG."""
    root = tmp_path_factory.mktemp("wds")
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(5):
                key = f"{shard:05d}{j:04d}"
                colour = list(CLASS_COLOURS.values())[j % 3]
                label = list(CLASS_COLOURS)[j % 3]
                data = image_bytes(make_image(colour, 100 + shard * 10 + j), "JPEG")
                if shard == 1 and j == 2:
                    data = data[:40]
                for ext, payload in (("jpg", data), ("json", json.dumps({"key": key}).encode()),
                                     ("txt", b"a caption"), ("cls", label.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def run_cli(main, capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def table(path):
    t = pq.read_table(path)
    return t.column("id").to_pylist(), t.column("source").to_pylist(), t.column("label").to_pylist(), \
        np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def test_ray_and_local_engines_write_the_same_shards(tmp_path, capsys, models, image_folder, wds_shards, ray_local):
    model, _ = models
    for images, size, n_shards in ((image_folder, 7, 3), (wds_shards, 7, 2)):
        outs = {}
        for engine in ("local", "ray"):
            out = tmp_path / f"{images.name}-{engine}"
            code, _, err = run_cli(embed_mod.main, capsys, "--images", images, "--out", out, "--model", model,
                                        "--engine", engine, "--shard-size", size, "--no-progress", "--batch-size", 4)
            assert code == 0, err
            outs[engine] = out
        m = {e: json.loads((o / "manifest.json").read_text()) for e, o in outs.items()}
        assert len(m["local"]["shards"]) == n_shards and m["local"]["model"]["fingerprint"] == "colour0000000000"
        assert m["local"]["shards"] == m["ray"]["shards"]
        for entry in m["local"]["shards"]:
            a, b = table(outs["local"] / entry["file"]), table(outs["ray"] / entry["file"])
            assert a[:3] == b[:3]
            np.testing.assert_array_equal(a[3], b[3])
    # the folder's shards: the images in input order, labelled, with the vectors the index embeds
    ids, sources, labels, vectors = zip(*(table(outs_f) for outs_f in sorted(
        (tmp_path / f"{image_folder.name}-local").glob("part-*.parquet"))))
    sources, labels = [s for part in sources for s in part], [v for part in labels for v in part]
    collection = open_collection(str(image_folder))
    assert sources == [str(image_folder.resolve() / collection.name(i)) for i in range(N)]
    assert ids[1][0] == 1 << 32 and labels[0] == "blue"
    encoder = open_encoder(str(model))
    np.testing.assert_allclose(np.concatenate(vectors), embed_collection(encoder, collection, progress=False).vectors,
                               atol=1e-6)
    # the WebDataset shards: labels from .cls, the corrupt JPEG counted in its shard only
    wm = m["local"]
    assert wm["rows"] == 9 and [s["unreadable"] for s in wm["shards"]] == [0, 1]
    ids, sources, labels, _ = table(outs["local"] / "part-00001.parquet")
    assert sources[0].endswith("00001.tar:000010000.jpg") and labels[:3] == ["blue", "green", "blue"]
    assert "000010002.jpg" in wm["unreadable_examples"][0]["source"]


def test_a_killed_run_resumes_without_embedding_finished_shards(tmp_path, models, image_folder):
    """The list file's fourth image is a FIFO: the job writes shard 0 (three images), then blocks
    reading it, and is killed there; the re-run (the FIFO now an image) skips shard 0."""
    model, _ = models
    paths = sorted(image_folder.rglob("img_0[0-2].*"))[:6]
    fifo = tmp_path / "slow.png"
    os.mkfifo(fifo)
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{p}\tx\n" for p in paths[:3]) + "slow.png\n" + "".join(f"{p}\n" for p in paths[3:]))
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "app.embed", "--images", str(listing), "--out", str(out), "--model", str(model),
           "--shard-size", "3", "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "part-00000.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "part-00001.parquet").exists()
    first = (out / "part-00000.parquet").stat()
    fifo.unlink()
    shutil.copy(paths[0], fifo)
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "resuming: 1 of 3 shards already written, 2 to go" in done.stderr
    assert "7 embeddings in 3 shards" in done.stdout and "2 shards embedded now" in done.stdout
    again = (out / "part-00000.parquet").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert table(out / "part-00000.parquet")[2] == ["x", "x", "x"]


def test_index_from_shards_equals_index_from_folder(tmp_path, capsys, models, image_folder):
    model, _ = models
    emb = tmp_path / "emb"
    assert embed_mod.main(["--images", str(image_folder), "--out", str(emb), "--model", str(model),
                           "--shard-size", "5", "--no-progress"]) == 0
    code, stdout, err = run_cli(index_cli.main, capsys, "build", "--embeddings", emb, "--out", tmp_path / "a")
    assert code == 0, err
    assert f"indexed {N} embeddings" in stdout and "flat index, exact search" in stdout
    code, _, err = run_cli(index_cli.main, capsys, "build", "--images", image_folder, "--out", tmp_path / "b",
                           "--model", model, "--no-progress")
    assert code == 0, err
    a, b = SearchIndex.load(tmp_path / "a"), SearchIndex.load(tmp_path / "b")
    assert a.items == b.items and a.sources == b.sources and a.kind == b.kind == "flat"
    np.testing.assert_allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-6)
    q = np.asarray(b.vectors[:5])
    np.testing.assert_array_equal(a.search(q, 6)[1], b.search(q, 6)[1])
    assert a.image_path(3) == b.image_path(3) and a.load_image(3).size == b.load_image(3).size


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_tar_sourced_images_show_in_the_search_gallery(tmp_path, capsys, models, wds_shards, backend):
    """Images indexed from WebDataset shards are read back from their tars: the page's gallery
    shows them (not the grey tile of a missing file) and the paths name the tar and member."""
    from PIL import Image

    from app import ops, ui
    from app.backend import Backend
    model, _ = models
    emb = tmp_path / "emb"
    assert embed_mod.main(["--images", str(wds_shards), "--out", str(emb), "--model", str(model),
                           "--no-progress"]) == 0
    chosen = Backend(backend, qdrant_path=str(tmp_path / "qd") if backend == "qdrant" else None)
    flags = ["--backend", "qdrant", "--qdrant-path", tmp_path / "qd"] if backend == "qdrant" else []
    code, _, err = run_cli(index_cli.main, capsys, "build", "--embeddings", emb, "--out", tmp_path / "ix", *flags)
    assert code == 0, err
    index = chosen.open(tmp_path / "ix")
    state = ui.AppState(index, open_encoder(str(model)), k=3, downloads_dir=tmp_path / "app")
    try:
        with tarfile.open(wds_shards / "00001.tar") as tar:
            jpeg = tar.extractfile("000010003.jpg").read()
        (tmp_path / "q.jpg").write_bytes(jpeg)
        gallery, status = state.search(str(tmp_path / "q.jpg"))
        assert "3 nearest of 9 images" in status, status
        # the best hit is the query itself, read back from its tar pixel for pixel; none is a grey tile
        original = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(gallery[0][0]), original)
        assert all(np.asarray(thumb).std() > 1 for thumb, _ in gallery)
        hit = index.neighbours(ops.embed_one(state.encoder, str(tmp_path / "q.jpg")), 1)[0]
        assert index.image_path(hit["id"]) == f"{(wds_shards / '00001.tar').resolve()}:000010003.jpg"
    finally:
        state.close()
        if backend == "qdrant":
            index.client.close()


def test_ivfpq_from_shards_matches_the_in_memory_build(tmp_path, capsys):
    """Synthetic vectors in shards: the same IVF-PQ (parameters, tuned breadth, results) as
    SearchIndex.build gives them in memory."""
    import pyarrow as pa
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    x = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    emb = tmp_path / "emb"
    emb.mkdir()
    model = {"fingerprint": "synthetic", "embedding_dim": 16}
    shards = []
    for s, lo in enumerate(range(0, 3000, 1000)):
        stats = {"shard": s, "file": embed_mod.shard_name(s), "rows": 1000, "unreadable": 0,
                 "unreadable_examples": [], "fingerprint": "synthetic"}
        t = pa.table({"id": pa.array(range(lo, lo + 1000), pa.int64()),
                      "source": [f"/v/{i}" for i in range(lo, lo + 1000)], "label": pa.nulls(1000, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:lo + 1000].ravel()), 16)})
        pq.write_table(t.replace_schema_metadata({embed_mod.META_KEY: json.dumps(stats).encode()}),
                       emb / stats["file"])
        shards.append({k: stats[k] for k in ("file", "rows", "unreadable")})
    (emb / "manifest.json").write_text(json.dumps({
        "format": embed_mod.FORMAT, "model": model, "shards": shards, "rows": 3000, "unreadable": 0,
        "input": {"kind": "list", "spec": "/v.txt", "shard_size": 1000, "shards": 3}}))
    code, _, err = run_cli(index_cli.main, capsys, "build", "--embeddings", emb, "--out", tmp_path / "ix",
                           "--index-type", "ivfpq")
    assert code == 0, err
    shards_ix = SearchIndex.load(tmp_path / "ix")
    memory = SearchIndex.build(x, [{"source": 0, "name": f"v/{i}"} for i in range(3000)], model=model, kind="ivfpq")
    assert shards_ix.kind == "ivfpq" and shards_ix.params == memory.params and shards_ix.recall == memory.recall
    q = x[::97] + 0.05
    np.testing.assert_array_equal(shards_ix.search(q, 10)[1], memory.search(q, 10)[1])


def test_qdrant_local_mode_build_add_search_info(tmp_path, capsys, models, image_folder, flat_folder):
    model, other = models
    qd = ["--backend", "qdrant", "--qdrant-path", tmp_path / "qdrant"]
    out = tmp_path / "photos"
    code, stdout, err = run_cli(index_cli.main, capsys, "build", "--images", image_folder, "--out", out,
                                "--model", model, "--no-progress", *qd)
    assert code == 0, err
    assert f"indexed {N} images" in stdout and "qdrant index, Qdrant, cosine" in stdout
    query = image_folder / "green" / "img_03.jpg"
    code, stdout, err = run_cli(index_cli.main, capsys, "search", "--index", out, "--image", query, "-k", "4",
                                "--model", model, "--json", *qd)
    assert code == 0, err
    hits = json.loads(stdout)
    assert [h["label"] for h in hits] == ["green"] * 4
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["score"] > 0.999
    code, stdout, err = run_cli(index_cli.main, capsys, "add", "--index", out, "--images", flat_folder, "--model",
                                model, "--no-progress", *qd)
    assert code == 0 and "added 6 images" in stdout and f"holds {N + 6} images" in stdout, err
    code, stdout, _ = run_cli(index_cli.main, capsys, "add", "--index", out, "--images", flat_folder, "--model",
                              model, "--no-progress", *qd)
    assert "added 0 images, 6 already in the index" in stdout
    code, stdout, _ = run_cli(index_cli.main, capsys, "info", "--index", out, *qd)
    info = json.loads(stdout)
    assert info["count"] == N + 6 and info["kind"] == "qdrant" and info["qdrant"]["collection"] == "photos"
    assert info["model"]["fingerprint"] == "colour0000000000" and info["labels"] == sorted(CLASS_COLOURS)
    assert len(info["sources"]) == 2
    # the fingerprint guard, as on a FAISS index: another model's query or images are refused
    for command in (["search", "--image", query], ["add", "--images", flat_folder, "--no-progress"]):
        code, _, err = run_cli(index_cli.main, capsys, command[0], "--index", out, *command[1:], "--model", other, *qd)
        one_error(code, err, "fingerprint colour0000000000", "colour0000000001")
    # a second build into the same collection needs --force
    code, _, err = run_cli(index_cli.main, capsys, "build", "--images", image_folder, "--out", out, "--model", model,
                           "--no-progress", *qd)
    one_error(code, err, "already holds a collection 'photos'", "--force")
    # the shards of app.embed go into Qdrant too
    emb = tmp_path / "emb"
    assert embed_mod.main(["--images", str(image_folder), "--out", str(emb), "--model", str(model),
                           "--no-progress"]) == 0
    code, stdout, err = run_cli(index_cli.main, capsys, "build", "--embeddings", emb, "--out", tmp_path / "fromshards",
                                *qd)
    assert code == 0 and f"indexed {N} embeddings" in stdout, err


def test_bad_input_gives_one_error_line(tmp_path, capsys, models, image_folder):
    model, other = models
    emb, foreign = tmp_path / "emb", tmp_path / "foreign"
    for out, m in ((emb, model), (foreign, other)):
        assert embed_mod.main(["--images", str(image_folder), "--out", str(out), "--model", str(m),
                               "--shard-size", "10", "--no-progress"]) == 0
    # a shard of another model among the collection's
    mixed = tmp_path / "mixed"
    shutil.copytree(emb, mixed)
    shutil.copy(foreign / "part-00001.parquet", mixed / "part-00001.parquet")
    code, _, err = run_cli(index_cli.main, capsys, "build", "--embeddings", mixed, "--out", tmp_path / "ix1")
    one_error(code, err, "part-00001.parquet holds embeddings of model colour0000000001",
              "collection is of model colour0000000000")
    # an index of one model built from another model's embeddings
    code, _, err = run_cli(index_cli.main, capsys, "build", "--embeddings", emb, "--out", tmp_path / "ix2",
                           "--model", other)
    one_error(code, err, "colour0000000000", "colour0000000001")
    # a corrupt Parquet file
    broken = tmp_path / "broken"
    shutil.copytree(emb, broken)
    data = (broken / "part-00000.parquet").read_bytes()
    (broken / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(index_cli.main, capsys, "build", "--embeddings", broken, "--out", tmp_path / "ix3")
    one_error(code, err, "part-00000.parquet is not a byolkit embedding shard")
    # an embedding job into a folder of another model's embeddings
    code, _, err = run_cli(embed_mod.main, capsys, "--images", image_folder, "--out", emb, "--model", other,
                           "--shard-size", "10", "--no-progress")
    one_error(code, err, "holds embeddings of model colour0000000000", "choose a new --out")
    code, _, err = run_cli(embed_mod.main, capsys, "--images", tmp_path / "nowhere", "--out", tmp_path / "e",
                           "--model", model)
    one_error(code, err, "does not exist")
    # an unreachable Qdrant server
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(index_cli.main, capsys, "info", "--index", tmp_path / "ix", "--backend", "qdrant",
                           "--qdrant-url", url)
    one_error(code, err, f"Qdrant at {url} failed")
    with pytest.raises(SystemExit) as exit_:
        index_cli.main(["build", "--images", str(image_folder), "--out", str(tmp_path / "ix4"), "--model", str(model),
                        "--backend", "qdrant"])
    one_error(exit_.value.code, capsys.readouterr().err, "--qdrant-url URL", "--qdrant-path DIR")
