"""Generated data with a known answer, for tests, demos and CPU benchmarks.

`render_depth_scene` ray-casts a small scene whose depth can be read from the picture the way it
is read from a photo: a camera at a random height and downward tilt looks over a chequered ground
plane in perspective (the tiles shrink and crowd with distance), towards a textured back wall, with
shaded boxes and balls standing on the ground (their contact point and apparent size give their
distance). Depth is the true z-distance along the optical axis, in metres, at each pixel centre.

(Shapes on noise with COCO boxes and masks for detection live in trainer.downstream.write_shapes_coco.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


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
    cam = {"height": rng.uniform(1.2, 1.8), "pitch": np.radians(rng.uniform(6, 18)), "focal": size * rng.uniform(0.85, 1.0),
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
    image = np.mean([_cast(size, cam, objects, o)[0] for o in ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))], 0)
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


def write_nyu_like_mat(path: Path, count: int, size: int = 64, seed: int = 0, train: int | None = None) -> tuple[Path, Path]:
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
