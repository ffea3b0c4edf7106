"""The image set shipped with byolkit, so that the main job needs no data of the user's.

    app/data/shapes.zip        600 JPEGs, 64 x 64 px: six shapes (bar, circle, cross, ring, square,
                               triangle) x 100, in random colours, sizes and places over noisy, randomly
                               tinted backgrounds, one folder per shape (the labels only score retrieval)
    app/data/examples/*.jpg    one more picture of each shape, not in the zip: the app's example queries

They are drawn by trainer.demo.draw_shape, deterministically (seeds 0 and 1), and were generated
once with `python -m app.sampleset --out app/data`; regenerating gives the same pictures. They
were made by byolkit and are dedicated to the public domain (CC0 1.0): app/data/LICENSE.md.
"""
from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_ZIP = DATA_DIR / "shapes.zip"
EXAMPLES_DIR = DATA_DIR / "examples"
SIZE, PER_CLASS, QUALITY = 64, 100, 85


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def generate(out: Path, per_class: int = PER_CLASS, size: int = SIZE) -> tuple[Path, Path]:
    """Write out/shapes.zip and out/examples/ (deterministic)."""
    import numpy as np

    from trainer.demo import SHAPES, draw_shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(out / "shapes.zip", "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not deflate
        for shape in SHAPES:
            for i in range(per_class):
                info = zipfile.ZipInfo(f"{shape}/{shape}_{i:03d}.jpg", date_time=(2026, 1, 1, 0, 0, 0))
                zf.writestr(info, _jpeg(draw_shape(rng, shape, size)))
    rng = np.random.default_rng(1)
    (out / "examples").mkdir(exist_ok=True)
    for shape in SHAPES:
        (out / "examples" / f"{shape}.jpg").write_bytes(_jpeg(draw_shape(rng, shape, size)))
    return out / "shapes.zip", out / "examples"


def example_files(directory: Path = EXAMPLES_DIR) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.jpg"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.sampleset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DATA_DIR), help="where to write shapes.zip and examples/ (default %(default)s)")
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    args = p.parse_args(argv)
    archive, examples = generate(Path(args.out), args.per_class)
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.2f} MB) and {examples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
