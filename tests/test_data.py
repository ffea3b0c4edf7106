"""Image collections (folder, zip, flat), decoding, the batch plan, streamed crops and the
preprocessing contract."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import CLASS_COLOURS, GOOD_IN_DIRTY, IMAGE_H, IMAGE_W, PER_CLASS, image_bytes, make_image
from PIL import Image

from contract.preprocess import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDecodeError,
    Preprocessing,
    load_rgb,
    resize_shorter_side,
)
from trainer.augment import byol_views
from trainer.data import (
    BatchPlan,
    DataError,
    FolderCollection,
    TwoViewCrops,
    ZipCollection,
    collate_crops,
    decode_all,
    open_collection,
    stream_loader,
)

CLASSES = sorted(CLASS_COLOURS)
N_LABELLED = len(CLASSES) * PER_CLASS


# -- collections -------------------------------------------------------------------------------
def test_folder_collection_labels_from_subfolders(image_folder):
    c = open_collection(str(image_folder))
    assert isinstance(c, FolderCollection)
    assert len(c) == N_LABELLED  # README.txt and the hidden file are not images
    assert c.classes == CLASSES
    assert c.labels is not None and len(c.labels) == N_LABELLED
    for i in range(len(c)):
        cls = c.name(i).split("/")[0]
        assert c.labels[i] == CLASSES.index(cls)
        image = c.load(i)
        assert image.mode == "RGB" and image.size == (IMAGE_W, IMAGE_H)
        # the class is visible in the pixels: the mean colour is closest to the class colour
        mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
        nearest = min(CLASS_COLOURS, key=lambda k: np.abs(mean - CLASS_COLOURS[k]).sum())
        assert nearest == cls
    assert {c.name(i).rsplit(".", 1)[1] for i in range(len(c))} == {"png", "jpg"}


def test_zip_collection_matches_folder_without_unpacking(image_folder, image_zip):
    before = sorted(p.name for p in image_zip.parent.iterdir())
    z = open_collection(str(image_zip))
    f = open_collection(str(image_folder))
    assert isinstance(z, ZipCollection)
    assert len(z) == len(f) == N_LABELLED  # directory entries and __MACOSX are skipped
    assert z.classes == f.classes and z.labels == f.labels
    assert [z.name(i) for i in range(len(z))] == [f.name(i) for i in range(len(f))]
    for i in (0, 1, len(z) - 1):
        assert np.array_equal(np.asarray(z.load(i)), np.asarray(f.load(i)))
    assert sorted(p.name for p in image_zip.parent.iterdir()) == before  # nothing extracted


def test_zip_member_bigger_than_the_limit_is_not_unpacked(image_zip, monkeypatch):
    """A zip bomb's member (gigabytes of zeros in kilobytes) is refused from its header, not read."""
    from trainer import data
    z = open_collection(str(image_zip))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 100)  # the generated members are a few kB
    with pytest.raises(ImageDecodeError, match=r"unpacks to \d+ bytes, above the limit of 100"):
        z.load(0)


def test_zip_collection_pickles_without_its_handle(image_zip):
    import pickle
    z = open_collection(str(image_zip))
    z.load(0)
    assert z._zip is not None
    clone = pickle.loads(pickle.dumps(z))
    assert clone._zip is None
    assert np.array_equal(np.asarray(clone.load(2)), np.asarray(z.load(2)))


def test_flat_folder_is_unlabelled(flat_folder):
    c = open_collection(str(flat_folder))
    assert len(c) == 6
    assert c.labels is None and c.classes == []
    assert c.load(0).mode == "RGB"


def test_missing_path_raises_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        open_collection(str(missing))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_empty_folder_raises_data_error(empty_folder):
    with pytest.raises(DataError) as e:
        open_collection(str(empty_folder))
    assert "no images found" in str(e.value) and str(empty_folder) in str(e.value)


def test_plain_file_and_bad_zip_raise_data_error(tmp_path):
    text = tmp_path / "list.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a zip"):
        open_collection(str(text))
    empty_zip = tmp_path / "empty.zip"
    import zipfile
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("notes.txt", "no images")
    with pytest.raises(DataError, match="no images found"):
        open_collection(str(empty_zip))


def test_decode_all_skips_and_counts_unreadable(dirty_folder):
    c = open_collection(str(dirty_folder))
    assert len(c) == GOOD_IN_DIRTY + 2  # both bad files look like images by name
    pre = Preprocessing(24, 24)
    images, labels, skipped = decode_all(c, pre, workers=0, progress=False)
    assert skipped == 2
    assert images.shape == (GOOD_IN_DIRTY, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.tolist() == [-1] * GOOD_IN_DIRTY
    # no all-black placeholder for a failed image slipped through
    assert (images.flatten(1).float().mean(1) > 20).all()


def test_decode_all_labels_follow_the_images(image_folder):
    c = open_collection(str(image_folder))
    pre = Preprocessing(16, 16)
    images, labels, skipped = decode_all(c, pre, workers=0, progress=False)
    assert skipped == 0 and images.shape == (N_LABELLED, 3, 16, 16)
    assert labels.tolist() == c.labels
    # each class's dominant channel: blue -> 2, green -> 1, red -> 0
    dominant = images.float().mean((2, 3)).argmax(1)
    want = {"blue": 2, "green": 1, "red": 0}
    assert dominant.tolist() == [want[CLASSES[y]] for y in c.labels]


# -- the batch plan ----------------------------------------------------------------------------
def test_batch_plan_epoch_is_a_permutation():
    plan = BatchPlan(50, 8, seed=3)
    assert plan.steps_per_epoch == 6 and plan.local_batch == 8
    for epoch in range(2):
        seen = torch.cat([plan.indices(epoch * 6 + k) for k in range(6)])
        assert len(seen) == 48 and len(set(seen.tolist())) == 48  # no repeats within the epoch
        assert seen.min() >= 0 and seen.max() < 50
    e0 = torch.cat([plan.indices(k) for k in range(6)])
    e1 = torch.cat([plan.indices(6 + k) for k in range(6)])
    assert not torch.equal(e0, e1)  # a new order every epoch


def test_batch_plan_deterministic_and_resumable():
    a, b, c = BatchPlan(40, 5, seed=1), BatchPlan(40, 5, seed=1), BatchPlan(40, 5, seed=2)
    seq_a = [a.indices(s) for s in range(20)]
    assert all(torch.equal(x, b.indices(s)) for s, x in enumerate(seq_a))
    assert not all(torch.equal(x, c.indices(s)) for s, x in enumerate(seq_a))
    resumed = BatchPlan(40, 5, seed=1)  # starting mid-run, out of order
    for s in (13, 2, 19, 9):
        assert torch.equal(resumed.indices(s), seq_a[s])


def test_batch_plan_ranks_get_disjoint_slices_of_the_global_batch():
    single = BatchPlan(64, 16, seed=0)
    ranks = [BatchPlan(64, 16, seed=0, rank=r, world=4) for r in range(4)]
    assert all(p.local_batch == 4 and p.steps_per_epoch == 4 for p in ranks)
    for step in range(8):
        parts = [p.indices(step) for p in ranks]
        flat = torch.cat(parts).tolist()
        assert len(set(flat)) == 16
        assert flat == single.indices(step).tolist()


def test_batch_plan_batch_larger_than_data():
    with pytest.raises(DataError, match="batch size 9 is larger than the data set \\(8 images\\)"):
        BatchPlan(8, 9, seed=0)
    assert BatchPlan(8, 8, seed=0).steps_per_epoch == 1


# -- streamed crops ----------------------------------------------------------------------------
def test_two_view_crops_and_collate_skip_unreadable(dirty_folder):
    c = open_collection(str(dirty_folder))
    ds = TwoViewCrops(c, 16, byol_views(), seed=0)
    items = [ds[(0, i)] for i in range(len(c))]
    bad = [c.name(i) for i, x in enumerate(items) if x is None]
    assert sorted(bad) == ["corrupt.jpg", "notes.jpg"]
    for x in items:
        if x is not None:
            assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8
    batch, skipped = collate_crops(items)
    assert batch.shape == (GOOD_IN_DIRTY, 2, 3, 16, 16) and skipped == 2
    assert collate_crops([None, None]) == (None, 2)


def test_two_view_crops_depend_only_on_seed_step_and_index(image_folder):
    c = open_collection(str(image_folder))
    ds = TwoViewCrops(c, 16, byol_views(), seed=5)
    a = ds[(3, 4)]
    assert torch.equal(a, TwoViewCrops(c, 16, byol_views(), seed=5)[(3, 4)])
    assert not torch.equal(a, ds[(4, 4)])
    assert not torch.equal(a[0], a[1])  # the two views are cropped independently


def test_stream_loader_yields_planned_batches(dirty_folder):
    c = open_collection(str(dirty_folder))
    plan = BatchPlan(len(c), 4, seed=0)
    loader = stream_loader(c, plan, 12, byol_views(), seed=0, start_step=0, total_steps=2, workers=0,
                           pin_memory=False)
    got = list(loader)
    assert len(got) == 2
    assert sum(s for _, s in got) == 2  # across both steps (one epoch) both bad images were met
    for batch, skipped in got:
        assert batch.shape == (4 - skipped, 2, 3, 12, 12)


# -- the preprocessing contract ----------------------------------------------------------------
def test_resize_and_crop_shape_and_centre():
    pre = Preprocessing(24, 28)
    image = make_image((10, 200, 30), 0)  # 44x36
    out = pre.resize_and_crop(image)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    # the same as resizing the shorter side to 28 and cutting the centre by hand
    resized = image.resize((round(44 * 28 / 36), 28), Image.BILINEAR, reducing_gap=None)
    w, h = resized.size
    left, top = (w - 24) // 2, (h - 24) // 2
    assert np.array_equal(out, np.asarray(resized.crop((left, top, left + 24, top + 24))))
    assert pre(image_bytes(image, "PNG")).shape == (24, 24, 3)
    assert resize_shorter_side(image, 36) is image


def test_preprocessing_dict_round_trip_and_validation():
    pre = Preprocessing(32, 36, CIFAR10_MEAN, CIFAR10_STD, "bicubic")
    d = pre.to_dict()
    assert d["mean"] == list(CIFAR10_MEAN) and d["interpolation"] == "bicubic"
    import json
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == pre
    assert Preprocessing.for_image_size(224).resize_size == 256
    assert Preprocessing.for_image_size(32).resize_size == 32
    with pytest.raises(ValueError):
        Preprocessing(32, 16)
    with pytest.raises(ValueError):
        Preprocessing(32, 32, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError):
        Preprocessing(32, 32, interpolation="lanczos9")


def test_normalize_matches_normalize_tensor():
    pre = Preprocessing(8, 8, CIFAR10_MEAN, CIFAR10_STD)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    a = pre.normalize(batch)
    b = pre.normalize_tensor(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
    assert a.shape == (3, 3, 8, 8) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    expected_00 = (batch[1, 2, 5, 0] / 255.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]
    assert a[1, 0, 2, 5] == pytest.approx(expected_00, rel=1e-5)
    with pytest.raises(ValueError):
        pre.normalize(batch[0])


def test_load_rgb_rejects_non_images_and_oversized(tmp_path, dirty_folder):
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_rgb(b"definitely not an image")
    with pytest.raises(ImageDecodeError):
        load_rgb(dirty_folder / "corrupt.jpg")
    with pytest.raises(ImageDecodeError):
        load_rgb(dirty_folder / "notes.jpg")
    with pytest.raises(ImageDecodeError, match="cannot open"):
        load_rgb(tmp_path / "missing.png")
    png = image_bytes(make_image((1, 2, 3), 0), "PNG")  # 44x36 = 1584 pixels
    with pytest.raises(ImageDecodeError, match="44x36 pixels, above the limit of 1000"):
        load_rgb(png, max_pixels=1000)
    assert load_rgb(png, max_pixels=1584).size == (44, 36)


def test_load_rgb_reduces_a_jpeg_on_decode_when_asked(tmp_path):
    """reduce_to: libjpeg decodes at 1/2, 1/4 or 1/8 scale with both sides still at least that long
    (4000 x 3000 -> 500 x 375: 0.56 MB of pixels instead of 36 MB); other formats and the default decode
    at full size."""
    import io
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    assert load_rgb(jpeg).size == (4000, 3000)
    small = load_rgb(jpeg, reduce_to=192)
    assert small.size == (500, 375) and small.mode == "RGB"
    assert load_rgb(jpeg, reduce_to=1000).size == (2000, 1500)  # 1/4 would leave 750 < 1000
    assert np.abs(np.asarray(small, np.int16) - (10, 200, 30)).max() <= 4  # the same picture
    png = image_bytes(make_image((1, 2, 3), 0), "PNG")
    assert load_rgb(png, reduce_to=8).size == (44, 36)  # PNG has no reduce-on-decode
    with pytest.raises(ImageDecodeError, match="4000x3000 pixels, above the limit"):
        load_rgb(jpeg, max_pixels=1000, reduce_to=192)  # the limit is the file's size, not the reduced one


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (RGB) and holds a few bytes: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_our_pixel_limit_decides_not_pillows():
    """Pillow refuses headers above 2 x its MAX_IMAGE_PIXELS (179 Mpx) on its own: our limit and our
    message must decide either way, from the header, before anything is decoded."""
    bomb = png_header(20_000, 10_000)  # 200 Mpx in 100 bytes
    with pytest.raises(ImageDecodeError, match="is 200000000 pixels, above the limit of 64000000"):
        load_rgb(bomb)
    with pytest.raises(ImageDecodeError, match="20000x10000 pixels, above the limit of 150000000"), \
            pytest.warns(Image.DecompressionBombWarning):  # Pillow alone would refuse it as a bomb here
        load_rgb(bomb, max_pixels=150_000_000)


def test_load_rgb_converts_modes():
    for mode in ("L", "RGBA", "P", "CMYK"):
        img = Image.new(mode, (5, 4))
        buf = io.BytesIO()
        img.save(buf, "PNG" if mode != "CMYK" else "JPEG")
        out = load_rgb(buf.getvalue())
        assert out.mode == "RGB" and out.size == (5, 4)


def test_load_rgb_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    raw = Image.open(io.BytesIO(buf.getvalue()))
    assert raw.size == (40, 20) and raw.getexif().get(0x0112) == 6
    out = load_rgb(buf.getvalue())
    assert out.size == (20, 40)
    # rotated clockwise: the left edge becomes the top
    arr = np.asarray(out, dtype=np.int16)
    assert arr[:5, :, 2].mean() > 200 and arr[-5:, :, 0].mean() > 200


# -- order and labels through worker processes -------------------------------------------------
@pytest.fixture(scope="module")
def indexed_folder(tmp_path_factory):
    """Eleven flat-coloured images in two classes: image i's red channel is 20 * i."""
    root = tmp_path_factory.mktemp("indexed")
    for i in range(11):
        cls = "a" if i % 3 else "b"
        (root / cls).mkdir(exist_ok=True)
        Image.new("RGB", (20 + i, 18), (20 * i, 100, 50)).save(root / cls / f"{i:02d}.png")
    return root


def index_of(crops: torch.Tensor) -> list[int]:
    """Image indices from the red level of flat-coloured crops [..., 3, S, S]."""
    return (crops[..., 0, :, :].float().mean((-2, -1)) / 20).round().long().flatten().tolist()


def test_decode_all_keeps_order_and_labels_with_workers(indexed_folder):
    c = open_collection(str(indexed_folder))
    images, labels, skipped = decode_all(c, Preprocessing(12, 12), workers=2, progress=False)
    assert skipped == 0
    want = [int(c.name(i).split("/")[-1][:2]) for i in range(len(c))]  # the collection's own order
    assert index_of(images) == want
    assert labels.tolist() == c.labels == [0 if i % 3 else 1 for i in want]


def test_stream_loader_keeps_the_plan_order_with_workers(indexed_folder):
    c = open_collection(str(indexed_folder))
    position_to_image = [int(c.name(i).split("/")[-1][:2]) for i in range(len(c))]
    plan = BatchPlan(len(c), 3, seed=7)
    loader = stream_loader(c, plan, 8, byol_views(), seed=7, start_step=2, total_steps=9, workers=2,
                           pin_memory=False)
    got = list(loader)
    assert len(got) == 7  # steps 2..8, across epoch boundaries (3 steps per epoch)
    for step, (batch, skipped) in zip(range(2, 9), got, strict=True):
        assert skipped == 0 and batch.shape == (3, 2, 3, 8, 8)
        want = [position_to_image[i] for i in plan.indices(step).tolist()]
        assert index_of(batch[:, 0]) == want and index_of(batch[:, 1]) == want  # both views, same image
