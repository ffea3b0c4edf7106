"""The image preprocessing contract: the one definition of how a photo becomes encoder input.

Training evaluation, export, serving and the app all read a `Preprocessing` (saved with every
encoder) and call the functions here; nothing else resizes or normalises images on its own.

The contract, for inference:
  1. decode, apply the EXIF orientation, convert to RGB (refusing decompression bombs);
  2. resize the shorter side to `resize_size` (bilinear, antialiased);
  3. centre-crop `input_size` x `input_size`;
  4. scale to [0, 1] and normalise with `mean` / `std` (NCHW float32).
Steps 1-3 give the uint8 HWC image that clients send; step 4 may run inside the exported graph.

This module imports only numpy and Pillow so that light clients can use it without torch.
"""
from __future__ import annotations

import functools
import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Decompression-bomb guard: 64 megapixels is far above any photo an encoder needs.
MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

ImageSource = str | Path | bytes | Image.Image


class ImageDecodeError(ValueError):
    """An input that is not a readable image (corrupt, truncated, not an image, too large)."""


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    resize_size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.input_size <= 0 or self.resize_size < self.input_size:
            raise ValueError(f"need 0 < input_size <= resize_size, got {self.input_size}, {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERPOLATION)}")

    @classmethod
    def for_image_size(cls, input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Preprocessing:
        """The usual evaluation crop: 224 from 256 (ratio 0.875); small images are used whole."""
        resize = input_size if input_size <= 96 else round(input_size / 0.875)
        return cls(input_size, resize, tuple(mean), tuple(std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(int(d["input_size"]), int(d["resize_size"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), d.get("interpolation", "bilinear"))

    # -- steps 2-3: what every client does -------------------------------------------------
    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array [input_size, input_size, 3]."""
        image = resize_shorter_side(image, self.resize_size, self.interpolation)
        w, h = image.size
        left, top = (w - self.input_size) // 2, (h - self.input_size) // 2
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        return np.asarray(image, dtype=np.uint8)

    def __call__(self, source: ImageSource) -> np.ndarray:
        """Any image source -> uint8 [H, W, 3] ready for the encoder (steps 1-3)."""
        return self.resize_and_crop(load_rgb(source))

    # -- step 4: normalisation ----------------------------------------------------------------
    def normalize(self, batch_hwc: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], scaled to [0, 1] and normalised."""
        if batch_hwc.ndim != 4 or batch_hwc.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3], got shape {batch_hwc.shape}")
        x = batch_hwc.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def normalize_tensor(self, batch_chw):
        """torch uint8 [N, 3, H, W] (any device) -> float32, scaled and normalised (step 4)."""
        return normalize_unit_tensor(batch_chw.float() / 255.0, self.mean, self.std)


def normalize_unit_tensor(batch_chw, mean, std):
    """torch float [N, 3, H, W] in [0, 1] -> normalised with `mean` / `std`: step 4 on tensors,
    shared by inference (`Preprocessing.normalize_tensor`) and the training augmentations.
    `mean` / `std` may be sequences (made into device tensors once per device, then cached: no
    host-to-device copy per call) or float32 tensors already on the batch's device."""
    import torch
    if not torch.is_tensor(mean) or not torch.is_tensor(std):
        mean, std = _channel_stats(tuple(map(float, mean)), tuple(map(float, std)), batch_chw.device)
    return (batch_chw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple, std: tuple, device):
    """(mean, std) as float32 tensors on `device`, made once per device and contract."""
    import torch
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in training graphs too
        pair = torch.tensor([mean, std], dtype=torch.float32).to(device)
    return pair[0], pair[1]


_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return image.resize((new_w, new_h), _PIL_INTERPOLATION[interpolation], reducing_gap=None)


def load_rgb(source: ImageSource, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None,
             name: str | None = None) -> Image.Image:
    """Decode a path, bytes or PIL image into an RGB PIL image with EXIF orientation applied.

    reduce_to: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's reduce-on-decode,
    Pillow's draft) as long as both sides stay at least this long; for pictures only shown small
    (thumbnails). Other formats, and the default (None), decode at full size.
    name: what error messages call the image (e.g. "archive.zip:member.jpg" for bytes read from an
    archive); by default the path, or "<bytes>".
    Raises ImageDecodeError with a readable message for anything that is not a usable image.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if name is None:
            name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        try:
            # closed by the `with fp` below
            fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")  # noqa: SIM115
        except OSError as e:
            raise ImageDecodeError(f"cannot open image {name}: {e.strerror or e}") from None
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses only above twice this: our limit decides
        try:
            with fp:
                image = Image.open(fp)  # the header only
                w, h = image.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"image {name} is {w}x{h} pixels, above the limit of {max_pixels}")
                if reduce_to:
                    image.draft("RGB", (reduce_to, reduce_to))  # JPEG only; a no-op for other formats
                image.load()  # decode now, while the file is open, so truncation surfaces here
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:  # far above max_pixels: Pillow's header check came first
            size = re.search(r"\((\d+) pixels\)", str(e))
            raise ImageDecodeError(f"image {name} is {size.group(1) if size else 'over ' + str(max_pixels)} pixels, "
                                   f"above the limit of {max_pixels}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(f"not a readable image: {name} ({type(e).__name__}: {e})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001, S110 - a malformed EXIF block (any error) should not cost the image itself
        pass
    return image if image.mode == "RGB" else image.convert("RGB")
