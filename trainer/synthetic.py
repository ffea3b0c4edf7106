"""Generated data with a known answer, for tests, demos and CPU benchmarks.

`render_depth_scene` ray-casts a small scene whose depth can be read from the picture the way it
is read from a photo: a camera at a random height and downward tilt looks over a chequered ground
plane in perspective (the tiles shrink and crowd with distance), towards a textured back wall, with
shaded boxes and balls standing on the ground (their contact point and apparent size give their
distance). Depth is the true z-distance along the optical axis, in metres, at each pixel centre.

`write_shapes_coco` draws solid shapes on noise with their COCO boxes and polygon masks (detection
and instance segmentation); `draw_shape` / `write_shape_classes` draw one of six shapes per picture
in class folders (trainer.demo's data, and export.onnx's check images).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _cast(size: int, cam: dict, objects: list[dict], offsets: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One ray per pixel (at pixel + offsets) -> (RGB float [H, W, 3] in 0-1, z-depth [H, W])."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (u + offsets[0] - size / 2) / cam["focal"]
    y = -(v + offsets[1] - size / 2) / cam["focal"]
    s, c = np.sin(cam["pitch"]), np.cos(cam["pitch"])
    # camera axes in the world (y up): right = x, up = (0, c, s), forward = (0, -s, c); a ray with
    # camera-space z = 1 reaches z-depth t at parameter t
    d = np.stack([x, y * c - s, y * s + c], -1)
    origin = np.array([0.0, cam["height"], 0.0])
    t_best = np.full((size, size), np.inf)
    colour = np.zeros((size, size, 3))
    light = cam["light"]

    def keep(t, rgb):
        nearer = (t > 1e-6) & (t < t_best)
        t_best[nearer] = t[nearer]
        colour[nearer] = rgb[nearer]

    # the back wall: the plane z = wall (world), vertical stripes of two shades
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (cam["wall"] - origin[2]) / d[..., 2]
    p = origin + t[..., None] * d
    stripes = (np.floor(p[..., 0] / 0.7) + np.floor(p[..., 1] / 0.7)) % 2
    keep(t, np.where(stripes[..., None] > 0, cam["wall_rgb"], cam["wall_rgb"] * 0.75))
    # the ground: y = 0, a chequerboard of two colours
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[..., 1] < 0, -origin[1] / d[..., 1], np.inf)
    p = origin + np.where(np.isfinite(t), t, 0)[..., None] * d
    tiles = (np.floor(p[..., 0] / cam["tile"]) + np.floor(p[..., 2] / cam["tile"])) % 2
    keep(t, np.where(tiles[..., None] > 0, cam["ground_a"], cam["ground_b"]) * (0.55 + 0.45 * light[1]))
    for ob in objects:
        if ob["kind"] == "ball":
            centre = np.array([ob["x"], ob["r"], ob["z"]])
            oc = origin - centre
            a = (d * d).sum(-1)
            b = 2 * (d * oc).sum(-1)
            disc = b * b - 4 * a * ((oc * oc).sum() - ob["r"] ** 2)
            with np.errstate(invalid="ignore"):
                t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
            normal = origin + np.where(np.isfinite(t), t, 0)[..., None] * d - centre
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
        else:  # an upright box, slab test
            lo = np.array([ob["x"] - ob["w"] / 2, 0.0, ob["z"] - ob["w"] / 2])
            hi = np.array([ob["x"] + ob["w"] / 2, ob["h"], ob["z"] + ob["w"] / 2])
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (lo - origin) / d, (hi - origin) / d
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            t_in, t_out = near.max(-1), far.min(-1)
            t = np.where((t_in <= t_out) & (t_out > 0), t_in, np.inf)
            axis = near.argmax(-1)
            normal = np.zeros_like(d)
            np.put_along_axis(normal, axis[..., None], -np.sign(np.take_along_axis(d, axis[..., None], -1)), -1)
        shade = 0.25 + 0.75 * np.clip((normal * light).sum(-1), 0, 1)
        keep(t, ob["rgb"] * shade[..., None])
    return colour, t_best


def render_depth_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random scene -> (uint8 RGB [size, size, 3], float32 depth in metres [size, size])."""
    light = rng.normal(size=3) + np.array([0, 2.5, -1.0])
    cam = {"height": rng.uniform(1.2, 1.8), "pitch": np.radians(rng.uniform(6, 18)),
           "focal": size * rng.uniform(0.85, 1.0),
           "wall": rng.uniform(6.5, 9.0), "tile": rng.uniform(0.4, 0.8), "light": light / np.linalg.norm(light),
           "ground_a": rng.uniform(0.45, 0.9, 3), "ground_b": rng.uniform(0.05, 0.35, 3),
           "wall_rgb": rng.uniform(0.3, 0.8, 3)}
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        z = rng.uniform(2.0, cam["wall"] - 1.2)
        x = rng.uniform(-0.45, 0.45) * z
        if rng.random() < 0.5:
            objects.append({"kind": "ball", "x": x, "z": z, "r": rng.uniform(0.25, 0.6), "rgb": rng.uniform(0.2, 1, 3)})
        else:
            objects.append({"kind": "box", "x": x, "z": z, "w": rng.uniform(0.4, 1.0), "h": rng.uniform(0.5, 1.6),
                            "rgb": rng.uniform(0.2, 1, 3)})
    # depth at the pixel centres; the picture from four rays per pixel (antialiased texture)
    _, depth = _cast(size, cam, objects, (0.5, 0.5))
    offsets = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
    image = np.mean([_cast(size, cam, objects, o)[0] for o in offsets], 0)
    image = image + rng.normal(0, 0.015, image.shape)  # a little sensor noise
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), depth.astype(np.float32)


def write_depth_scenes(folder: Path, count: int, size: int = 64, seed: int = 0, depth_format: str = "png",
                       holes: float = 0.01) -> Path:
    """`count` scenes in trainer.depth's folder layout: folder/rgb/NNNNN.png and folder/depth/NNNNN.png
    (16-bit millimetres) or .npy (float32 metres); a fraction `holes` of depth pixels is 0 (no
    measurement), as with a real sensor. Returns `folder`."""
    from PIL import Image
    folder = Path(folder)
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    (folder / "depth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, depth = render_depth_scene(size, rng)
        depth[rng.random(depth.shape) < holes] = 0
        Image.fromarray(image).save(folder / "rgb" / f"{i:05d}.png")
        if depth_format == "npy":
            np.save(folder / "depth" / f"{i:05d}.npy", depth)
        else:
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(folder / "depth" / f"{i:05d}.png")
    return folder


def write_nyu_like_mat(path: Path, count: int, size: int = 64, seed: int = 0,
                       train: int | None = None) -> tuple[Path, Path]:
    """Scenes in the layout of NYU Depth v2's labelled file (HDF5 / MATLAB v7.3: images [N, 3, W, H]
    uint8, depths [N, W, H] float32 metres) and a splits file beside it (trainNdxs / testNdxs,
    1-based: the first `train` scenes, default three quarters, then the rest). Needs h5py."""
    import h5py
    rng = np.random.default_rng(seed)
    scenes = [render_depth_scene(size, rng) for _ in range(count)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["images"] = np.stack([im.transpose(2, 1, 0) for im, _ in scenes])
        f["depths"] = np.stack([d.T for _, d in scenes])
    train = count * 3 // 4 if train is None else train
    splits = path.with_name("splits.mat")
    with h5py.File(splits, "w") as f:
        f["trainNdxs"] = np.arange(1, train + 1)[None]
        f["testNdxs"] = np.arange(train + 1, count + 1)[None]
    return path, splits


# ============================================================================================
# Shapes in class folders (trainer.demo)
# ============================================================================================
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def draw_shape(rng: np.random.Generator, shape: str, size: int = 32) -> Image.Image:
    """One picture: a noisy tinted background with one shape of random colour, scale and place."""
    tint = rng.uniform(0, 255, 3)
    background = np.clip(tint + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    color = tuple(int(c) for c in rng.uniform(0, 255, 3))
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=color)
    return image


def write_shape_classes(root: Path, per_class: int, seed: int) -> Path:
    """Write root/<shape>/<n>.png (`per_class` pictures of each shape) unless it is already complete."""
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(rng, shape).save(root / shape / f"{i:04d}.png")
    marker.write_text("ok\n")
    return root


# ============================================================================================
# Shapes on noise with COCO boxes and instance masks (detection tests, benchmarks --tiny)
# ============================================================================================
SHAPE_CLASSES = ("square", "disk", "triangle")


def write_shapes_coco(folder: Path, count: int, size: int = 64, seed: int = 0, masks: bool = True,
                      max_objects: int = 3) -> tuple[Path, Path]:
    """Write `count` noisy size x size photos with 1-`max_objects` solid shapes each, and their COCO
    instances JSON (boxes, and polygon masks when `masks`). Returns (images folder, annotation file).

    Each class has its own shape and colour, so a detector can separate them after a short run;
    category ids start at 3 and skip one, as real COCO files do not number 1..K.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    colours = ((230, 40, 40), (40, 200, 60), (50, 80, 240))
    cat_ids = [3 + 2 * k for k in range(len(SHAPE_CLASSES))]
    images, anns = [], []
    for i in range(count):
        noise = rng.normal(110, 35, (size, size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        taken = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):  # shapes do not overlap, so boxes and masks stay exact
                s = int(rng.integers(size // 5, size // 2.5))
                x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
                if all(x + s <= a or a + b <= x or y + s <= c or c + b <= y for a, c, b in taken):
                    break
            else:
                continue
            taken.append((x, y, s))
            k = int(rng.integers(len(SHAPE_CLASSES)))
            if SHAPE_CLASSES[k] == "square":
                poly = [x, y, x + s, y, x + s, y + s, x, y + s]
            elif SHAPE_CLASSES[k] == "triangle":
                poly = [x + s / 2, y, x + s, y + s, x, y + s]
            else:  # a 16-gon: a disk whose polygon is exactly what is drawn
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                poly = np.stack([x + s / 2 + s / 2 * np.cos(t), y + s / 2 + s / 2 * np.sin(t)], 1).ravel().tolist()
            draw.polygon(poly, fill=colours[k])
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_ids[k], "bbox": box,
                   "area": box[2] * box[3], "iscrowd": 0}
            if masks:
                ann["segmentation"] = [[float(v) for v in poly]]
            anns.append(ann)
        name = f"{i:05d}.png"
        image.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    ann_path = folder / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, SHAPE_CLASSES)]}))
    return img_dir, ann_path
