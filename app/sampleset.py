"""The image set shipped with byolkit, so that the main job needs no data of the user's.

    app/data/flowers.zip       1,000 photographs of five kinds of flowers (daisy, dandelion, roses,
                               sunflowers, tulips) x 200, `<kind>/<file>.jpg`, shorter side SIZE px
                               (96: the gpu-photos preset's views and cpu-photos' encoder input;
                               cpu-photos trains on 48)
    app/data/examples/*.jpg    one more photo of each kind, not in the zip: the page's example queries
    app/data/CREDITS.txt       the licence statement and the credit line of every shipped photo

Source: the TensorFlow `flower_photos` collection, as prepared in flowers-demo (shorter side at
most 128 px). Every photo is licensed CC BY 2.0 by its Flickr photographer; the shipped copies
are resized and re-encoded. Which photos are shipped is decided by name alone (the SHA-256 of
`<kind>/<file>`, smallest first), so the choice is reproducible and the rest of the collection
(HELD_OUT) stays out of the package for validation (benchmarks/photos_preset.py).

    python -m app.sampleset --source ../shared/data/flowers-demo     # rewrites app/data
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_ZIP = DATA_DIR / "flowers.zip"
EXAMPLES_DIR = DATA_DIR / "examples"
CREDITS = DATA_DIR / "CREDITS.txt"
SIZE, PER_CLASS, QUALITY = 96, 200, 85
LICENCE = """\
# byolkit's sample photographs: app/data/flowers.zip and app/data/examples/
#
# Source: the TensorFlow flower_photos collection
#   (https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz).
# Every photo is licensed under the Creative Commons Attribution 2.0 Generic licence
#   (CC BY 2.0, https://creativecommons.org/licenses/by/2.0/) by the Flickr photographer named
#   on its line below. byolkit ships them resized (shorter side {size} px, bicubic) and
#   re-encoded as JPEG (quality {quality}); no other change was made.
#
# One line per shipped photo: <path> <credit line as published with the collection>, where
# <path> is a member of flowers.zip (<kind>/<file>.jpg) or examples/<file>.jpg.
"""


def _rank(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def read_credits(path: Path) -> dict[str, str]:
    """CREDITS.txt (flowers-demo's, or the shipped one) -> {path: credit line}; '#' lines are comments."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, credit = line.partition(" ")
            out[name] = credit
    return out


def split(source: Path, per_class: int = PER_CLASS) -> tuple[list[str], list[str], list[str]]:
    """flowers-demo -> (shipped, examples, held_out): `<kind>/<file>.jpg` names, per kind the
    `per_class` smallest by hash shipped, the next one an example, the rest held out."""
    images = Path(source) / "images"
    kinds = sorted(p.name for p in images.iterdir() if p.is_dir())
    if not kinds:
        raise ValueError(f"{images} holds no class folders")
    shipped, examples, held_out = [], [], []
    for kind in kinds:
        names = sorted((f"{kind}/{p.name}" for p in (images / kind).glob("*.jpg")), key=_rank)
        if len(names) <= per_class:
            raise ValueError(f"{images / kind} holds {len(names)} photos; {per_class + 1} are needed")
        shipped += sorted(names[:per_class])
        examples.append(names[per_class])
        held_out += sorted(names[per_class + 1:])
    return shipped, examples, held_out


def shrink(path: Path, size: int = SIZE, quality: int = QUALITY) -> bytes:
    """A photo with its shorter side at `size` px (never enlarged), as JPEG bytes."""
    from PIL import Image

    from contract.preprocess import resize_shorter_side
    with Image.open(path) as im:
        image = im.convert("RGB")
    if min(image.size) > size:
        image = resize_shorter_side(image, size, "bicubic")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def write_zip(source: Path, names: list[str], archive: Path, size: int = SIZE) -> Path:
    """The named photos of flowers-demo, shrunk, into a zip (stored: JPEGs do not deflate), atomically."""
    from trainer.checkpoint import atomic_write

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
                zf.writestr(info, shrink(Path(source) / "images" / name, size))
        Path(tmp).chmod(0o644)  # a package file, readable by all (mkstemp made it private)
    atomic_write(Path(archive), write)
    return Path(archive)


def example_name(name: str) -> str:
    """`<kind>/<file>.jpg` -> the example's file name, `<kind>_<file>.jpg`."""
    return name.replace("/", "_")


def generate(source: Path, out: Path, per_class: int = PER_CLASS, size: int = SIZE) -> dict:
    """Write out/flowers.zip, out/examples/ and out/CREDITS.txt from flowers-demo (deterministic)."""
    source, out = Path(source), Path(out)
    credits = read_credits(source / "CREDITS.txt")
    shipped, examples, held_out = split(source, per_class)
    missing = [n for n in shipped + examples if n not in credits]
    if missing:
        raise ValueError(f"no credit line for {len(missing)} photo(s), e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    write_zip(source, shipped, out / "flowers.zip", size)
    folder = out / "examples"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    for name in examples:
        (folder / example_name(name)).write_bytes(shrink(source / "images" / name, size))
    lines = [LICENCE.format(size=size, quality=QUALITY)]
    lines += [f"{n} {credits[n]}" for n in shipped]
    lines += [f"examples/{example_name(n)} {credits[n]}" for n in examples]
    (out / "CREDITS.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"zip": out / "flowers.zip", "shipped": len(shipped), "examples": len(examples), "held_out": len(held_out)}


def example_files(directory: Path = EXAMPLES_DIR) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.jpg"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.sampleset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the flowers-demo folder (images/<kind>/*.jpg and CREDITS.txt)")
    p.add_argument("--out", default=str(DATA_DIR), help="where to write flowers.zip, examples/ and CREDITS.txt "
                   "(default %(default)s)")
    p.add_argument("--per-class", type=int, default=PER_CLASS, help="photos per kind (default %(default)s)")
    p.add_argument("--size", type=int, default=SIZE, help="shorter side in px (default %(default)s)")
    args = p.parse_args(argv)
    try:
        done = generate(Path(args.source), Path(args.out), args.per_class, args.size)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done['zip']} ({done['zip'].stat().st_size / 1e6:.2f} MB, {done['shipped']} photos), "
          f"{done['examples']} examples and CREDITS.txt; {done['held_out']} photos held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
