"""Monocular depth estimation on a BYOL encoder: the BYOL paper's last transfer task (NYU Depth v2,
following Laina et al., "Deeper depth prediction with fully convolutional residual networks").

    python -m trainer.depth --encoder runs/byol --train data/train --val data/val --out runs/depth
    python -m trainer.depth --encoder runs/byol --train nyu_depth_v2_labeled.mat \\
        --val nyu_depth_v2_labeled.mat --split splits.mat --out runs/nyu
    torchrun --nproc_per_node 4 -m trainer.depth ...      # DDP (SyncBatchNorm with --norm sync on GPUs)
    python -m trainer.depth --out runs/depth --resume     # a killed run continues where it stopped

Data (--train / --val), one of:
  * a folder with rgb/NAME.jpg|png and depth/NAME.png (16-bit, --depth-scale units per metre,
    1000 = millimetres) or depth/NAME.npy (float metres); every photo needs its depth map;
  * NYU Depth v2's labelled file nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5, read with h5py):
    --train takes the official split's trainNdxs (795 images), --val its testNdxs (654), from
    --split splits.mat;
  * a list file of the depth literature's kind (one "RGB DEPTH [FOCAL]" line per sample, paths
    relative to --data-root or to the list's folder; 16-bit PNG depth as above).
A depth value of 0, NaN, or outside --min-depth/--max-depth is "no measurement": masked in the
loss, the metrics and the pictures. Everything is checked before training starts.

Model: the encoder (any byolkit ResNet, either stem) and a decoder: Laina et al.'s up-projection
decoder (default; 1x1 conv to half width, four up-projection blocks) or a light FPN decoder over
layer1-4. The network predicts log depth; the output is upsampled to the input size.

Loss: berHu (default), the reverse Huber of Laina et al.: L1 for residuals below c = 0.2 x the
batch's largest residual, quadratic above. It is the loss of the protocol the paper follows; it
keeps gradients from small residuals (which dominate once training has converged) while weighting
the large ones of far, hard pixels. --loss silog gives Eigen et al.'s scale-invariant log loss
(lambda 0.5), for data whose absolute scale is ambiguous.

Augmentation (image and depth together): random scaling by s in [1, --max-scale] with depth
divided by s (the scene moves closer), random crop, horizontal flip; colour jitter (brightness,
contrast, saturation) on the image only. Normalisation follows the encoder's preprocessing
contract; evaluation resizes the shorter side to --base-size and compares at the depth map's own
resolution. AdamW with a poly or cosine learning rate per step; channels-last; bf16 autocast on GPUs.

Metrics, on valid pixels, averaged over images: abs rel, sq rel, RMSE, RMSE log, log10 and
delta < 1.25, 1.25^2, 1.25^3; the Eigen crop for NYU; optional median scaling (off by default).
Predictions are clamped to [--min-depth, --max-depth] before scoring.

RUN/ receives checkpoint.pt (atomic, every epoch and on SIGINT/SIGTERM), metrics.json (atomic,
every epoch, with the score of predicting the training set's mean depth everywhere as a floor),
predictions/*.jpg (image | prediction | ground truth, one colour scale, with its scale bar) and a
one-line JSON summary on stdout.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from contract.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, Preprocessing, load_rgb, resize_shorter_side

from .. import checkpoint as ckpt_io
from .. import settings
from ..distributed import Dist, all_reduce, barrier, shutdown
from ..optim import cosine_scheduler, poly_schedule
from ..runtime import UsageError, cli_main, log
from ..sources import ENCODER_SOURCE_HELP, open_encoder
from .common import (
    NORM_CHOICES,
    DenseSettings,
    EpochLoop,
    RunState,
    add_run_flags,
    add_scale_bar,
    check_norm_for_device,
    colour_map,
    displayed_size,
    finetune_main,
    prepare_resnet,
    sample_rng,
    save_run,
    side_by_side,
    stage_channels,
    start_processes,
    wrap_distributed,
    write_json,
)

METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")
NYU_SIZE = (480, 640)  # height, width of NYU Depth v2's frames
EIGEN_CROP = (45, 471, 41, 601)  # rows top:bottom, columns left:right in those frames (Eigen et al. 2014)


# ============================================================================================
# Data: three layouts, one reader; everything checked before training
# ============================================================================================
def read_depth_file(path: Path, scale: float) -> np.ndarray:
    """A depth map file -> float32 metres [H, W] (values as stored; masking comes later).

    .npy: float metres. .png (any image format): single-channel 16-bit, divided by `scale`."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"depth map {path} is not a readable .npy file ({e})") from None
        if d.ndim != 2 or not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
            raise UsageError(f"depth map {path} holds a {d.dtype} array of shape {d.shape}; expected float "
                             "metres [H, W]")
        return d.astype(np.float32)
    try:
        with Image.open(path) as im:
            if im.mode in ("L", "P", "1", "LA"):
                raise UsageError(f"depth map {path} is an 8-bit image ({im.mode}); expected a 16-bit PNG "
                                 f"({scale:g} units per metre, see --depth-scale)")
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise UsageError(f"depth map {path} is a {im.mode} image; expected a single-channel 16-bit PNG")
            d = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"depth map {path} is not a readable image ({type(e).__name__}: {e})") from None
    return d.astype(np.float32) / scale


def clean_depth(depth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """Invalid pixels (NaN, infinite, 0, outside (min, max)) -> 0; 0 means "no measurement" from here on."""
    valid = np.isfinite(depth) & (depth > min_depth) & (depth < max_depth)
    return np.where(valid, depth, 0).astype(np.float32)


@dataclass
class DepthData:
    """One split: photo/depth pairs on disk, or rows of NYU's .mat file. `read` gives (RGB, metres, 0 = invalid)."""
    kind: str                                    # folder | list | nyu
    names: list[str]
    min_depth: float
    max_depth: float
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    depth_scale: float = 1000.0
    mat: Path | None = None
    rows: list[int] = field(default_factory=list)  # 0-based rows of the .mat file
    depth_var: str = "depths"
    mean_depth: float = 0.0                      # over valid pixels, set by the scan
    size: tuple[int, int] | None = None          # (H, W) when every depth map has the same size

    def __len__(self):
        return len(self.names)

    def __getstate__(self):  # an open HDF5 handle does not cross into worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_h5"}

    def _file(self):
        import h5py
        if getattr(self, "_h5", None) is None or self._h5[0] != os.getpid():
            self._h5 = (os.getpid(), h5py.File(self.mat, "r"))
        return self._h5[1]

    def read(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Raises ImageDecodeError for a photo that does not decode."""
        if self.kind == "nyu":
            f = self._file()
            rgb = np.ascontiguousarray(f["images"][self.rows[i]].transpose(2, 1, 0))  # stored [3, W, H]
            depth = np.asarray(f[self.depth_var][self.rows[i]], np.float32).T
            return Image.fromarray(rgb.astype(np.uint8)), clean_depth(depth, self.min_depth, self.max_depth)
        photo, depth_path = self.pairs[i]
        return load_rgb(photo), clean_depth(read_depth_file(depth_path, self.depth_scale), self.min_depth,
                                            self.max_depth)


def open_depth_data(spec: str, split: str, cfg: DepthSettings, progress: bool = False) -> DepthData:
    """--train / --val -> a checked DepthData (UsageError for anything unusable)."""
    path = Path(spec)
    flag = f"--{split}"
    common = {"min_depth": cfg.min_depth, "max_depth": cfg.max_depth}
    if path.is_dir():
        if not ((path / "rgb").is_dir() and (path / "depth").is_dir()):
            raise UsageError(f"{flag} {path}: expected the folders rgb/ and depth/ in it")
        pairs = _folder_pairs(path)
        data = DepthData("folder", [p.stem for p, _ in pairs], pairs=pairs, depth_scale=cfg.depth_scale, **common)
    elif path.suffix.lower() == ".mat":
        data = _open_nyu(path, split, cfg, common)
    elif path.is_file():
        pairs = _list_pairs(path, cfg.data_root, flag)
        data = DepthData("list", [f"{i:05d}_{p.stem}" for i, (p, _) in enumerate(pairs)], pairs=pairs,
                         depth_scale=cfg.depth_scale, **common)
    else:
        raise UsageError(f"{flag} {path} does not exist")
    _check_depths(data, flag, progress)
    return data


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    def files(folder, exts):
        out = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
                if p.stem in out:
                    raise UsageError(f"{folder} holds two files named {p.stem}: {out[p.stem].name} and {p.name}")
                out[p.stem] = p
        return out
    photos = files(root / "rgb", IMAGE_EXTENSIONS)
    depths = files(root / "depth", (".png", ".npy"))
    if not photos:
        raise UsageError(f"no photos in {root / 'rgb'}")
    lonely = [photos[s].name for s in photos if s not in depths]
    if lonely:
        raise UsageError(f"{len(lonely)} photo(s) in {root / 'rgb'} have no depth map (.png or .npy) in "
                         f"{root / 'depth'}: {', '.join(lonely[:5])}{' ...' if len(lonely) > 5 else ''}")
    orphans = [depths[s].name for s in depths if s not in photos]
    if orphans:
        raise UsageError(f"{len(orphans)} depth map(s) in {root / 'depth'} name no photo in {root / 'rgb'}: "
                         f"{', '.join(orphans[:5])}")
    return [(photos[s], depths[s]) for s in sorted(photos)]


def _list_pairs(path: Path, root: str | None, flag: str) -> list[tuple[Path, Path]]:
    base = Path(root) if root else path.parent
    pairs = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path} is not a readable list file ({e})") from None
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or fields[1].lower() == "none":
            raise UsageError(f"{path} line {n}: expected 'RGB DEPTH [FOCAL]', the photo {fields[0]} has no depth map")
        resolved = []
        for entry in fields[:2]:
            p = Path(entry)
            p = p if p.is_absolute() and p.exists() else base / entry.lstrip("/")
            if not p.is_file():
                raise UsageError(f"{path} line {n}: {p} does not exist (paths are relative to "
                                 f"{'--data-root' if root else 'the list file'} {base})")
            resolved.append(p)
        pairs.append(tuple(resolved))
    if not pairs:
        raise UsageError(f"{flag} {path} lists no samples")
    return pairs


def read_split(path: str | Path) -> dict[str, list[int]]:
    """NYU's splits.mat (trainNdxs, testNdxs: 1-based; MATLAB v5 via scipy or v7.3 via h5py) -> 0-based rows."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--split {path} does not exist")
    raw = {}
    try:
        import h5py
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                raw = {k: np.asarray(f[k]) for k in ("trainNdxs", "testNdxs") if k in f}
        else:
            from scipy.io import loadmat
            raw = {k: v for k, v in loadmat(path).items() if k in ("trainNdxs", "testNdxs")}
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--split {path} is not a readable .mat file ({e})") from None
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in raw]
    if missing:
        raise UsageError(f"--split {path} has no variable {missing[0]!r} "
                         "(NYU's splits.mat holds trainNdxs and testNdxs)")
    return {"train": [int(v) - 1 for v in np.ravel(raw["trainNdxs"])],
            "val": [int(v) - 1 for v in np.ravel(raw["testNdxs"])]}


def _open_nyu(path: Path, split: str, cfg: DepthSettings, common: dict) -> DepthData:
    try:
        import h5py
    except ImportError:
        raise UsageError("reading NYU's .mat file needs h5py: pip install 'byolkit[downstream]'") from None
    if not path.is_file():
        raise UsageError(f"--{split} {path} does not exist")
    if not cfg.split:
        raise UsageError(f"--{split} {path} is NYU's .mat file: name the official split with --split splits.mat")
    if not h5py.is_hdf5(path):
        raise UsageError(f"--{split} {path} is not a MATLAB v7.3 (HDF5) file like nyu_depth_v2_labeled.mat")
    rows = read_split(cfg.split)[split]
    var = cfg.nyu_depth
    with h5py.File(path, "r") as f:
        for name in ("images", var):
            if name not in f:
                raise UsageError(f"{path} has no variable {name!r} (it has: {', '.join(sorted(f.keys())[:12])})")
        images, depths = f["images"], f[var]
        if images.ndim != 4 or images.shape[1] != 3 or depths.ndim != 3 or images.shape[0] != depths.shape[0] \
                or images.shape[2:] != depths.shape[1:]:
            raise UsageError(f"{path}: images {images.shape} and {var} {depths.shape} are not NYU's "
                             "[N, 3, W, H] and [N, W, H]")
        if not rows or min(rows) < 0 or max(rows) >= images.shape[0]:
            raise UsageError(f"--split {cfg.split}: indices outside 1-{images.shape[0]}")
    return DepthData("nyu", [f"nyu_{r + 1:04d}" for r in rows], mat=path, rows=rows, depth_var=var, **common)


def _check_depths(data: DepthData, flag: str, progress: bool) -> None:
    """Read every depth map: readable, of the photo's size, at least one valid pixel. Sets mean_depth."""
    from tqdm import tqdm
    bad_size, empty, sizes = [], [], set()
    total, count = 0.0, 0
    for i in tqdm(range(len(data)), desc=f"checking {flag[2:]} depth", unit="map", disable=not progress, leave=False):
        if data.kind == "nyu":
            depth = clean_depth(np.asarray(data._file()[data.depth_var][data.rows[i]], np.float32).T,
                                data.min_depth, data.max_depth)
        else:
            photo, depth_path = data.pairs[i]
            depth = clean_depth(read_depth_file(depth_path, data.depth_scale), data.min_depth, data.max_depth)
            w, h = displayed_size(photo)
            if depth.shape != (h, w):
                bad_size.append(f"{depth_path.name} is {depth.shape[1]}x{depth.shape[0]}, {photo.name} is {w}x{h}")
        sizes.add(depth.shape)
        valid = depth > 0
        if not valid.any():
            empty.append(data.names[i] if data.kind == "nyu" else data.pairs[i][1].name)
        total += float(depth[valid].sum(dtype=np.float64))
        count += int(valid.sum())
    if bad_size:
        raise UsageError(f"{len(bad_size)} depth map(s) of {flag} differ in size from their photo: "
                         f"{'; '.join(bad_size[:3])}")
    if empty:
        raise UsageError(f"{len(empty)} depth map(s) of {flag} have no valid pixel (0, NaN or outside "
                         f"{data.min_depth:g}-{data.max_depth:g} m; check --depth-scale): {', '.join(empty[:5])}")
    data.mean_depth = total / count
    data.size = next(iter(sizes)) if len(sizes) == 1 else None


# ============================================================================================
# Joint augmentation and the data sets
# ============================================================================================
def augment(photo: Image.Image, depth: np.ndarray, rng: np.random.Generator, base_size: int,
            crop: tuple[int, int], max_scale: float, jitter: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Scale by s in [1, max_scale] (shorter side base_size x s; depth / s, nearest so that no invalid
    pixel bleeds into a valid one), pad (photo black, depth invalid) to the crop, random crop, flip;
    brightness / contrast / saturation jitter on the photo only. -> (uint8 [h, w, 3], float32 [h, w])."""
    s = float(rng.uniform(1.0, max_scale))
    w, h = photo.size
    factor = base_size * s / min(w, h)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = np.asarray(photo.resize(size, Image.BILINEAR), dtype=np.float32)
    depth = np.asarray(Image.fromarray(depth).resize(size, Image.NEAREST), dtype=np.float32) / s
    ch, cw = crop
    ph, pw = max(ch - size[1], 0), max(cw - size[0], 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        depth = np.pad(depth, ((0, ph), (0, pw)))
    top = int(rng.integers(0, image.shape[0] - ch + 1))
    left = int(rng.integers(0, image.shape[1] - cw + 1))
    image, depth = image[top:top + ch, left:left + cw], depth[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        image, depth = image[:, ::-1], depth[:, ::-1]
    b, c, sat = rng.uniform(1 - jitter, 1 + jitter, 3)
    image = image * b
    grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
    image = (image - grey.mean()) * c + grey.mean()
    grey = (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    image = (image - grey) * sat + grey
    return np.clip(image, 0, 255).round().astype(np.uint8), np.ascontiguousarray(depth, dtype=np.float32)


class _Samples(torch.utils.data.Dataset):
    def __init__(self, data: DepthData):
        self.data = data

    def __len__(self):
        return len(self.data)

    def read(self, index):
        """(photo, depth), or None for a photo that no longer decodes (skipped and counted)."""
        try:
            return self.data.read(index)
        except ImageDecodeError:
            return None


class TrainSet(_Samples):
    """(uint8 [3, h, w], float32 [h, w]) per sample, augmented; None for a photo that no longer decodes."""

    def __init__(self, data: DepthData, cfg: DepthSettings):
        super().__init__(data)
        self.cfg, self.epoch = cfg, 0

    def __getitem__(self, index):
        sample = self.read(index)
        if sample is None:
            return None
        c = self.cfg
        image, depth = augment(*sample, sample_rng(c.seed, self.epoch, index), c.base_size, tuple(c.crop_size),
                               c.max_scale)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(depth)


class EvalSet(_Samples):
    """The photo at --base-size (the contract's resize) and the full-resolution depth; None if unreadable."""

    def __init__(self, data: DepthData, base_size: int):
        super().__init__(data)
        self.base = base_size

    def __getitem__(self, index):
        sample = self.read(index)
        if sample is None:
            return None
        photo, depth = sample
        small = resize_shorter_side(photo, self.base)
        return (torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1), torch.from_numpy(depth), index,
                torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1))


def _as_is(item):
    """Evaluation's collate: one sample (or None) at a time, untouched (a function, so workers can pickle it)."""
    return item


def collate(items):
    """Drop samples that failed to decode; (photos, depths, how many were dropped)."""
    kept = [it for it in items if it is not None]
    if not kept:
        return None, None, len(items)
    return torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept]), len(items) - len(kept)


# ============================================================================================
# Model: encoder + up-projection (Laina et al.) or light FPN decoder
# ============================================================================================
DECODERS = ("upproj", "fpn")


def unpool(x: torch.Tensor) -> torch.Tensor:
    """Laina et al.'s 2x unpooling: each value to the top-left of a 2x2 cell, zeros elsewhere."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, 2 * h, 2 * w)
    out[:, :, ::2, ::2] = x
    return out


class UpProjection(nn.Module):
    """unpool, then 5x5 conv-BN-ReLU-3x3 conv-BN plus a 5x5 conv-BN projection, summed, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2, bias=False), nn.BatchNorm2d(cout),
                                    nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(cout))
        self.project = nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = unpool(x)
        return F.relu(self.branch(x) + self.project(x))


class UpProjectionDecoder(nn.Module):
    """layer4 -> 1x1 conv to half its width -> four up-projections halving the width -> 3x3 conv to one map."""

    def __init__(self, channels: list[int]):
        super().__init__()
        widths = [max(8, channels[-1] // 2 ** k) for k in range(1, 6)]
        self.reduce = nn.Sequential(nn.Conv2d(channels[-1], widths[0], 1, bias=False), nn.BatchNorm2d(widths[0]))
        self.up = nn.Sequential(*[UpProjection(a, b) for a, b in itertools.pairwise(widths)])
        self.head = nn.Conv2d(widths[-1], 1, 3, padding=1)

    def forward(self, features: dict) -> torch.Tensor:
        return self.head(self.up(self.reduce(features["layer4"])))


class FPNDecoder(nn.Module):
    """torchvision's FeaturePyramidNetwork over layer1-4; the levels upsampled to layer1's size and
    summed, then 3x3 conv-BN-ReLU and a 3x3 conv to one map."""

    def __init__(self, channels: list[int], width: int = 64):
        from torchvision.ops import FeaturePyramidNetwork
        super().__init__()
        width = min(width, channels[-1])
        self.fpn = FeaturePyramidNetwork(channels, width)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.head = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, features: dict) -> torch.Tensor:
        levels = list(self.fpn(features).values())
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(p, size=size, mode="bilinear", align_corners=False) if p.shape[-2:] != size else p
                    for p in levels)
        return self.head(self.fuse(fused))


class DepthNet(nn.Module):
    """Photo (normalised) -> depth in metres at the input size (exp of the predicted log depth)."""

    def __init__(self, encoder: nn.Module, decoder: str, init_depth: float):
        from torchvision.models._utils import IntermediateLayerGetter
        super().__init__()
        channels = stage_channels(encoder)
        self.encoder = IntermediateLayerGetter(encoder, {f"layer{i}": f"layer{i}" for i in range(1, 5)})
        self.decoder = UpProjectionDecoder(channels) if decoder == "upproj" else FPNDecoder(channels)
        with torch.no_grad():  # start at the training set's mean depth rather than at 1 m
            self.decoder.head.bias.fill_(math.log(init_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encoder(x))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.exp(y.float().clamp(-12, 12))[:, 0]


def build_model(encoder: nn.Module, decoder: str, init_depth: float, trainable_layers: int = 5,
                norm: str = "bn") -> DepthNet:
    if decoder not in DECODERS:
        raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    return DepthNet(prepare_resnet(encoder, trainable_layers, norm), decoder, init_depth)


# ============================================================================================
# Losses and metrics
# ============================================================================================
def berhu_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reverse Huber over valid pixels (target > 0): |r| below c = 0.2 max |r|, (r^2 + c^2) / 2c above."""
    valid = target > 0
    r = (pred - target).abs()[valid]
    if r.numel() == 0:
        return pred.sum() * 0
    c = (0.2 * r.max()).detach().clamp(min=1e-6)
    return torch.where(r <= c, r, (r * r + c * c) / (2 * c)).mean()


def silog_loss(pred: torch.Tensor, target: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Eigen et al.'s scale-invariant log loss per image, mean(d^2) - lam mean(d)^2, d = log pred - log target."""
    valid = target > 0
    d = torch.where(valid, torch.log(pred.clamp(min=1e-6)) - torch.log(target.clamp(min=1e-6)), 0)
    n = valid.flatten(1).sum(1)
    keep = n > 0
    if not keep.any():
        return pred.sum() * 0
    mean = d.flatten(1).sum(1)[keep] / n[keep]
    mean_sq = (d * d).flatten(1).sum(1)[keep] / n[keep]
    return (mean_sq - lam * mean * mean).mean()


LOSSES = {"berhu": berhu_loss, "silog": silog_loss}


def eigen_crop_mask(height: int, width: int) -> torch.Tensor:
    """The Eigen crop (rows 45-470, columns 41-600 of a 480x640 NYU frame), scaled to height x width."""
    top, bottom, left, right = EIGEN_CROP
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[round(top * height / NYU_SIZE[0]):round(bottom * height / NYU_SIZE[0]),
         round(left * width / NYU_SIZE[1]):round(right * width / NYU_SIZE[1])] = True
    return mask


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                  median_scaling: bool = False) -> dict[str, float] | None:
    """The standard metrics of one image over `valid` pixels (default: target > 0), in float64.
    None when no pixel is valid."""
    valid = (target > 0) if valid is None else valid & (target > 0)
    p, g = pred[valid].double(), target[valid].double()
    if g.numel() == 0:
        return None
    if median_scaling:
        p = p * (g.median() / p.median())
    ratio = torch.maximum(p / g, g / p)
    return {"abs_rel": ((p - g).abs() / g).mean().item(),
            "sq_rel": ((p - g) ** 2 / g).mean().item(),
            "rmse": ((p - g) ** 2).mean().sqrt().item(),
            "rmse_log": ((p.log() - g.log()) ** 2).mean().sqrt().item(),
            "log10": (p.log10() - g.log10()).abs().mean().item(),
            "delta1": (ratio < 1.25).double().mean().item(),
            "delta2": (ratio < 1.25 ** 2).double().mean().item(),
            "delta3": (ratio < 1.25 ** 3).double().mean().item()}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: EvalSet, pre: Preprocessing, cfg: DepthSettings, device, dist: Dist,
             baseline_depth: float, progress: bool = False) -> tuple[dict, dict, int]:
    """Metrics averaged over this split's images (each scored by one process, sums reduced), the same
    for a constant prediction of `baseline_depth`, and how many photos failed to decode."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 * len(METRICS) + 2, dtype=torch.float64)  # model, baseline, images, unreadable
    share = torch.utils.data.Subset(dataset, range(dist.rank, len(dataset), dist.world))
    loader = torch.utils.data.DataLoader(share, batch_size=None, num_workers=cfg.workers, collate_fn=_as_is)
    for item in tqdm(loader, desc="evaluating", unit="img", disable=not progress, leave=False):
        if item is None:
            sums[-1] += 1
            continue
        photo, depth, _, _ = item
        pred = predict(model, photo, depth.shape, pre, device)
        valid = eigen_mask_for(cfg, depth.shape) & (depth > 0)
        clamp = (cfg.min_depth, cfg.max_depth)
        m = depth_metrics(pred.clamp(*clamp), depth, valid, cfg.median_scaling)
        b = depth_metrics(torch.full_like(depth, baseline_depth).clamp(*clamp), depth, valid, cfg.median_scaling)
        if m is None:  # nothing valid inside the crop
            continue
        sums[:len(METRICS)] += torch.tensor([m[k] for k in METRICS], dtype=torch.float64)
        sums[len(METRICS):2 * len(METRICS)] += torch.tensor([b[k] for k in METRICS], dtype=torch.float64)
        sums[-2] += 1
    sums = all_reduce(sums, dist).cpu()
    n = max(sums[-2].item(), 1)
    scores = {k: sums[i].item() / n for i, k in enumerate(METRICS)}
    scores["images"] = int(sums[-2].item())
    baseline = {k: sums[len(METRICS) + i].item() / n for i, k in enumerate(METRICS)}
    model.train(was_training)
    return scores, baseline, int(sums[-1].item())


def eigen_mask_for(cfg: DepthSettings, shape) -> torch.Tensor:
    if cfg.eigen_crop_on:
        return eigen_crop_mask(*shape)
    return torch.ones(*shape, dtype=torch.bool)


def predict(model: nn.Module, photo: torch.Tensor, size, pre: Preprocessing, device) -> torch.Tensor:
    """uint8 [3, h, w] photo -> depth [H, W] (float32, CPU) at the ground truth's size."""
    x = pre.normalize_tensor(photo[None].to(device)).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x)
    return F.interpolate(out[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0].cpu()


def draw_depth(model: nn.Module, dataset: EvalSet, pre: Preprocessing, cfg: DepthSettings, device,
               folder: Path) -> list[Path]:
    """predictions/NAME.jpg for the first --draw validation images: photo | prediction | ground truth,
    on one colour scale (the ground truth's valid range), with its scale bar; invalid pixels grey."""
    model.eval()
    written = []
    for index in range(min(cfg.draw, len(dataset))):
        item = dataset[index]
        if item is None:
            continue
        small, depth, _, photo = item
        with torch.no_grad():
            pred = predict(model, small, depth.shape, pre, device).clamp(cfg.min_depth, cfg.max_depth)
        valid = depth > 0
        low, high = depth[valid].min().item(), depth[valid].max().item()
        panels = [photo, torch.from_numpy(colour_map(pred.numpy(), low, high)).permute(2, 0, 1),
                  torch.from_numpy(colour_map(depth.numpy(), low, high, invalid=~valid.numpy())).permute(2, 0, 1)]
        picture = add_scale_bar(side_by_side(*panels), low, high, "m")
        path = folder / f"{dataset.data.names[index]}.jpg"
        folder.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write(path, lambda tmp, p=picture: p.save(tmp, "JPEG", quality=90))
        written.append(path)
    model.train()
    return written


# ============================================================================================
# Training
# ============================================================================================
def open_backbone(cfg: DepthSettings, state: dict | None):
    """The encoder (from its source, or rebuilt for a resumed run whose weights are in the checkpoint)
    and its description, which the run keeps (cfg.backbone)."""
    from ..models import build_encoder
    if state is not None:
        info = state["config"]["backbone"]
        encoder, _ = build_encoder(info["arch"], info["stem"])
        return encoder, info
    encoder, raw = open_encoder(cfg.encoder, cfg.seed)
    cfg.backbone = {"arch": raw["arch"], "stem": raw["stem"], "embedding_dim": int(raw["embedding_dim"]),
                    "preprocessing": raw["preprocessing"].to_dict(), "fingerprint": raw["fingerprint"],
                    "source": raw.get("source", "byol"), "step": int(raw.get("step", 0))}
    return encoder, cfg.backbone


def train(cfg: DepthSettings, out: Path, state: dict | None = None, progress: bool = True) -> dict | None:
    """Fine-tune and evaluate; returns the summary in the main process (None in the others)."""
    # ---- 1. processes, device, seeds; 2. encoder (a bad source fails before the data scan) ------
    dist, device_type = start_processes(cfg)
    device = dist.device
    check_norm_for_device(cfg.norm, dist, device_type)
    encoder, info = open_backbone(cfg, state)
    pre = Preprocessing.from_dict(info["preprocessing"])

    # ---- 3. data, checked before anything trains ----------------------------------------------
    show = progress and dist.is_main
    train_data = open_depth_data(cfg.train, "train", cfg, show)
    val_data = open_depth_data(cfg.val, "val", cfg, show)
    eigen = cfg.eigen_crop
    cfg.eigen_crop_on = eigen == "on" or (eigen == "auto" and (val_data.kind == "nyu" or val_data.size == NYU_SIZE))
    if cfg.train_mean_depth is None:
        cfg.train_mean_depth = train_data.mean_depth
    steps_per_epoch = len(train_data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_data)} training sample(s) do not fill one batch of {cfg.batch_size}; "
                         "lower --batch-size")
    train_set, val_set = TrainSet(train_data, cfg), EvalSet(val_data, cfg.base_size)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    per_process = cfg.batch_size // dist.world

    # ---- 4. network, optimiser, schedule ---------------------------------------------------------
    net = build_model(encoder, cfg.decoder, cfg.train_mean_depth, cfg.trainable_layers, cfg.norm)
    net = net.to(device).to(memory_format=torch.channels_last)
    model = wrap_distributed(net, cfg.norm, dist, device)
    if dist.enabled:
        net = model.module
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    lr_at = (poly_schedule(cfg.lr, total_steps) if cfg.schedule == "poly"
             else cosine_scheduler(cfg.lr, 0.0, total_steps, inclusive=True)).tolist()
    loss_fn = LOSSES[cfg.loss]

    # ---- 5. resume, the run directory ---------------------------------------------------------------
    at = RunState.start(out, cfg, state, net, optimizer, per_process, steps_per_epoch, dist)

    def save(epoch: int, position: int):
        if dist.is_main:
            save_run(out, model=net, optimizer=optimizer, epoch=epoch, position=position,
                     step=epoch * steps_per_epoch + position // per_process, config=cfg, history=at.history,
                     extra={"skipped_unreadable": at.skipped})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device_type == "cuda")

    def loss_of(batch):
        photos, depths, unreadable = batch
        if photos is None:  # every photo of the batch failed; a DDP peer still needs our gradients
            photos = torch.zeros(2, 3, *cfg.crop_size, dtype=torch.uint8)
            depths = torch.zeros(2, *cfg.crop_size)
        x = pre.normalize_tensor(photos.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        with autocast:
            pred = model(x)
        return loss_fn(pred.float(), depths.to(device, non_blocking=True)), unreadable

    baseline = {}

    def end_epoch(record: dict, last: bool):
        if last or (cfg.eval_every and record["epoch"] % cfg.eval_every == 0):
            t_eval = time.perf_counter()
            scores, baseline_scores, unreadable_val = evaluate(net, val_set, pre, cfg, device, dist,
                                                               cfg.train_mean_depth, show)
            baseline.update(baseline_scores)
            record.update(scores, val_unreadable=unreadable_val)
            if last and cfg.draw and dist.is_main:
                draw_depth(net, val_set, pre, cfg, device, out / "predictions")
            record["eval_seconds"] = time.perf_counter() - t_eval
            log(dist, f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, abs rel {scores['abs_rel']:.4f}, "
                      f"RMSE {scores['rmse']:.4f}, delta1 {scores['delta1']:.4f}")
        at.history.append(record)
        save(record["epoch"], 0)
        if dist.is_main:
            write_json(out / "metrics.json", _metrics_doc(cfg, info, train_data, val_data, baseline, at,
                                                          record if last else None))

    # ---- 6. the training loop ----------------------------------------------------------------------
    loop = EpochLoop(model=model, optimizer=optimizer, train_set=train_set, sampler=sampler, lr_at=lr_at,
                     per_process=per_process, epochs=cfg.epochs, workers=cfg.workers, seed=cfg.seed, dist=dist,
                     device=device, desc="depth", show=show, collate_fn=collate)
    stopped = loop.run(at, loss_of, end_epoch, save)
    if at.skipped:
        log(dist, f"skipped {at.skipped} training photo(s) that failed to decode")
    final = at.history[-1] if at.history and at.history[-1]["epoch"] == cfg.epochs else None
    summary = {"run": str(out), "epochs": at.epoch, "steps": at.step, "stopped": stopped,
               "world_size": dist.world, "skipped_unreadable": at.skipped,
               **({k: final[k] for k in (*METRICS, "train_loss")} if final else {})}
    barrier(dist)
    shutdown(dist)
    return summary if dist.is_main else None


def _metrics_doc(cfg: DepthSettings, info: dict, train_data, val_data, baseline: dict, at: RunState,
                 final: dict | None) -> dict:
    return {"task": "depth", "encoder": cfg.encoder, "backbone": info, "decoder": cfg.decoder,
            "loss": cfg.loss, "eigen_crop": cfg.eigen_crop_on, "median_scaling": cfg.median_scaling,
            "data": {"train": len(train_data), "val": len(val_data), "train_layout": train_data.kind,
                     "val_layout": val_data.kind, "train_mean_depth": cfg.train_mean_depth},
            "metrics_note": "valid pixels only, averaged over images; predictions clamped to "
                            f"[{cfg.min_depth:g}, {cfg.max_depth:g}] m",
            "baseline_mean_depth": baseline, "skipped_unreadable": {"train": at.skipped},
            "history": at.history, "final": final}


# ============================================================================================
# Settings and command line
# ============================================================================================
PATH_FLAGS = ("train", "val", "split", "data_root")


@dataclass
class DepthSettings(DenseSettings):
    """Every setting of a depth run (config.json; `--set name=value` reaches each by name)."""
    task: str = "depth"
    train: str | None = None          # absolute paths
    val: str | None = None
    split: str | None = None
    data_root: str | None = None
    nyu_depth: str = "depths"
    depth_scale: float = 1000.0
    min_depth: float = 1e-3
    max_depth: float = 10.0
    decoder: str = "upproj"
    loss: str = "berhu"
    epochs: int = 20
    lr: float = 2e-4
    schedule: str = "poly"
    crop_size: list = field(default_factory=lambda: [228, 304])  # H, W (the flag also takes "HxW" or "N")
    max_scale: float = 1.5
    eigen_crop: str = "auto"
    median_scaling: bool = False
    trainable_layers: int = 5
    norm: str = "bn"
    eigen_crop_on: bool | None = None     # filled in when the run starts
    train_mean_depth: float | None = None

    def normalise(self) -> None:
        for key in PATH_FLAGS:
            if getattr(self, key):
                setattr(self, key, str(Path(getattr(self, key)).resolve()))
        self.crop_size = parse_crop(self.crop_size)

    def check(self) -> None:
        missing = [f for f in ("encoder", "train", "val") if not getattr(self, f)]
        if missing:
            raise UsageError(f"missing {', '.join('--' + f for f in missing)}")
        for key, choices in (("decoder", DECODERS), ("loss", tuple(LOSSES)), ("schedule", ("poly", "cosine")),
                             ("eigen_crop", ("auto", "on", "off")), ("norm", NORM_CHOICES),
                             ("nyu_depth", ("depths", "rawDepths"))):
            if getattr(self, key) not in choices:
                raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}")
        self.check_ranges(positive=("lr", "depth_scale", "max_depth"))
        if not 0 <= self.min_depth < self.max_depth:
            raise UsageError("need 0 <= --min-depth < --max-depth")
        if not self.max_scale >= 1:
            raise UsageError("--max-scale must be at least 1")


def get_args_parser() -> argparse.ArgumentParser:
    d = DepthSettings()
    p = argparse.ArgumentParser(
        prog="python -m trainer.depth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a BYOL encoder for monocular depth estimation (Laina et al.'s up-projection "
                    "decoder or a light FPN decoder) and evaluate it by the standard depth metrics.",
        epilog="Data (--train/--val): a folder with rgb/NAME.jpg|png and depth/NAME.png (16-bit, --depth-scale "
               "units per metre)\n  or depth/NAME.npy (float metres); NYU Depth v2's nyu_depth_v2_labeled.mat with "
               "--split splits.mat\n  (train: trainNdxs, val: testNdxs); or a list file of 'RGB DEPTH [FOCAL]' lines.\n"
               "Invalid depth (0, NaN, outside --min-depth/--max-depth) is masked everywhere.\n"
               "Loss: berHu by default (Laina et al.'s, the protocol the BYOL paper follows: L1 for small residuals,\n"
               "  L2 for large ones, so both the many near-converged pixels and the hard far ones keep a useful\n"
               "  gradient); --loss silog is Eigen et al.'s scale-invariant log loss, for data of ambiguous scale.\n"
               "Metrics: abs rel, sq rel, RMSE, RMSE log, log10, delta<1.25^k on valid pixels, mean over images.\n"
               "RUN/: checkpoint.pt, metrics.json (every epoch), predictions/*.jpg (photo | prediction | truth).\n"
               "Several GPUs: torchrun --nproc_per_node N -m trainer.depth ...")
    p.add_argument("--encoder", help=f"backbone: {ENCODER_SOURCE_HELP}")
    p.add_argument("--train", help="training data (see below)")
    p.add_argument("--val", help="validation data (see below)")
    p.add_argument("--out", required=True, help="run directory (new, unless --resume)")
    p.add_argument("--split", help="NYU's official splits.mat (trainNdxs / testNdxs) when the data is the .mat file")
    p.add_argument("--data-root", help="folder the paths of a list file are relative to (default: the list's folder)")
    p.add_argument("--nyu-depth", choices=["depths", "rawDepths"], help="NYU .mat variable: in-painted depths "
                   f"(the literature's ground truth) or raw sensor depth with holes (default {d.nyu_depth})")
    p.add_argument("--depth-scale", type=float, help=f"16-bit PNG units per metre (default {d.depth_scale:g}: mm)")
    p.add_argument("--min-depth", type=float, help=f"smaller depths are invalid (default {d.min_depth:g} m)")
    p.add_argument("--max-depth", type=float, help=f"larger depths are invalid (default {d.max_depth:g} m, NYU's)")
    p.add_argument("--decoder", choices=DECODERS,
                   help=f"up-projection (Laina et al.) or light FPN (default {d.decoder})")
    p.add_argument("--loss", choices=sorted(LOSSES), help=f"berhu or silog, see below (default {d.loss})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay:g})")
    p.add_argument("--schedule", choices=["poly", "cosine"], help=f"per-step LR decay (default {d.schedule})")
    p.add_argument("--base-size", type=int, help="shorter side the photos are resized to for training (before "
                   f"scaling) and evaluation (default {d.base_size}: NYU at half size, as Laina et al.)")
    p.add_argument("--crop-size", help=f"training crop, HxW or N (default {'x'.join(map(str, d.crop_size))})")
    p.add_argument("--max-scale", type=float, help=f"random scaling s in [1, this]; depth / s (default {d.max_scale})")
    p.add_argument("--eigen-crop", choices=["auto", "on", "off"], help="score only the Eigen crop; auto: on for NYU "
                   "(the .mat file, or data of NYU's 640x480 size)")
    p.add_argument("--median-scaling", action="store_true", default=None, help="scale each prediction by "
                   "median(truth) / median(prediction) before scoring (off by default)")
    p.add_argument("--trainable-layers", type=int, choices=range(6), metavar="0-5",
                   help=f"encoder stages trained, from layer4 down to conv1 (default {d.trainable_layers}: all)")
    p.add_argument("--norm", choices=NORM_CHOICES, help=f"encoder BatchNorm: bn, frozen or sync (default {d.norm})")
    add_run_flags(p, d, "validation images drawn into RUN/predictions",
                  "continue the run in --out from its checkpoint (its settings are kept; only --epochs, "
                  "--workers, --device, --eval-every and --draw may change)")
    return p


def parse_crop(text) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        raise UsageError(f"--crop-size must be HxW or N, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 16:
        raise UsageError(f"--crop-size must be HxW or N, each at least 16, got {text!r}")
    return parts


def resolve_settings(args: argparse.Namespace, saved: dict | None) -> DepthSettings:
    """A new run: defaults, --set, flags. A resumed run: its own settings; only --epochs, --workers,
    --device, --eval-every and --draw may change."""
    s = settings.resolve(DepthSettings, saved, args.set, vars(args), prepare=DepthSettings.normalise)
    s.check()
    return s


@cli_main(errors=(ImageDecodeError,))
def main(argv=None) -> int:
    return finetune_main(argv, get_args_parser(), "depth", resolve_settings, train)


if __name__ == "__main__":
    sys.exit(main())
