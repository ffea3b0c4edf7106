"""BYOL's asymmetric augmentations T and T' (Grill et al. 2020, appendix B), batched.

Every operation takes a whole batch [B, 3, H, W] with its own random parameters per image,
so the same code runs on the GPU (where the CPU workers then only decode and crop) and on CPU
tensors. The crop comes in two forms that sample crops the same way (torchvision's
RandomResizedCrop algorithm): `crop_resize_batch` for a batch of equally sized images already
in memory, and `crop_resize_pil` for one decoded image in a data-loader worker.

One deliberate difference from torchvision: colour jitter applies its four adjustments in a
random order drawn once per batch instead of once per image. Each image's distribution is the
same; per-image orders would cost four passes of every adjustment over the batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from contract.preprocess import normalize_unit_tensor

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL uses (torchvision: 0.2989, within 1e-4)


@dataclass(frozen=True)
class ViewAugmentation:
    """Parameters of one view's augmentation (T or T')."""
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0

    def to_dict(self):
        return asdict(self)


def byol_views(blur: bool = True, crop_scale=(0.08, 1.0), color_strength: float = 1.0,
               grayscale_p: float = 0.2) -> tuple[ViewAugmentation, ViewAugmentation]:
    """The paper's T and T'. Small images (CIFAR-like) drop the blur, as is usual there.

    `color_strength` scales the jitter magnitudes (0.4, 0.4, 0.2, 0.1); 1 is the paper's.
    """
    s = color_strength
    common = {"crop_scale": tuple(crop_scale), "brightness": 0.4 * s, "contrast": 0.4 * s, "saturation": 0.2 * s,
              "hue": 0.1 * s, "grayscale_p": grayscale_p}
    t1 = ViewAugmentation(**common, blur_p=1.0 if blur else 0.0, solarize_p=0.0)
    t2 = ViewAugmentation(**common, blur_p=0.1 if blur else 0.0, solarize_p=0.2)
    return t1, t2


# --------------------------------------------------------------------------------------------
# Random resized crop
# --------------------------------------------------------------------------------------------
def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale, ratio,
                      generator: torch.Generator | None = None, attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampling, vectorised: boxes [B, 4] as (top, left, h, w).

    Up to `attempts` candidates per image; the first that fits wins, else a central crop with
    the aspect ratio clamped to `ratio`.
    """
    b = heights.shape[0]
    h_img, w_img = heights.double(), widths.double()
    area = (h_img * w_img)[:, None]
    u = torch.rand(b, attempts, 4, generator=generator, dtype=torch.float64, device=heights.device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    top = torch.floor(u[..., 2] * (h_img[:, None] - h + 1))
    left = torch.floor(u[..., 3] * (w_img[:, None] - w + 1))
    missing = torch.full((b,), -1, dtype=torch.long, device=heights.device)
    first = torch.where(fits.any(1), fits.double().argmax(1), missing)
    pick = first.clamp(min=0)[:, None]
    box = torch.stack([top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0],
                       h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]], 1)
    # Fallback: the largest central crop whose ratio lies within bounds.
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img))
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    fallback = torch.stack([torch.floor((h_img - fh) / 2), torch.floor((w_img - fw) / 2), fh, fw], 1)
    return torch.where((first >= 0)[:, None], box, fallback)


def crop_resize_pil(image: Image.Image, size: int, aug: ViewAugmentation,
                    generator: torch.Generator) -> torch.Tensor:
    """One decoded image -> uint8 [3, size, size]: random resized crop and flip (worker side)."""
    w_img, h_img = image.size
    top, left, h, w = sample_crop_boxes(torch.tensor([h_img]), torch.tensor([w_img]),
                                        aug.crop_scale, aug.crop_ratio, generator)[0].tolist()
    out = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if torch.rand(1, generator=generator).item() < aug.flip_p:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(_pil_to_chw(out))


def _pil_to_chw(image: Image.Image):
    import numpy as np
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def crop_resize_batch(images: torch.Tensor, size: int, aug: ViewAugmentation) -> torch.Tensor:
    """uint8 or float [B, 3, H, W] -> float [B, 3, size, size] in [0, 1]: crop, resize, flip.

    One bilinear `grid_sample` per batch, with the crop box and the flip folded into each
    image's affine sampling grid.
    """
    b, _, h_img, w_img = images.shape
    dev = images.device
    # Sampled on the images' device: no host-device round trip in the training loop.
    boxes = sample_crop_boxes(torch.full((b,), h_img, device=dev), torch.full((b,), w_img, device=dev),
                              aug.crop_scale, aug.crop_ratio)
    top, left, h, w = boxes.float().unbind(1)
    flip = torch.rand(b, device=dev) < aug.flip_p
    # Normalised coordinates (align_corners=False): pixel edge 0 -> -1, edge W -> +1.
    sx = w / w_img
    cx = (left + w / 2) / w_img * 2 - 1
    sy = h / h_img
    cy = (top + h / 2) / h_img * 2 - 1
    sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------
# Photometric operations on float [B, 3, H, W] in [0, 1], per-image factors of shape [B]
# --------------------------------------------------------------------------------------------
def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x, other, factor):
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * other).clamp_(0, 1)


def adjust_brightness(x, factor):
    return (x * factor[:, None, None, None]).clamp_(0, 1)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` (in turns, [-0.5, 0.5]) through HSV, as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    cr = maxc - minc
    eq = maxc == minc
    s = cr / torch.where(eq, torch.ones_like(maxc), maxc)
    crd = torch.where(eq, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift[:, None, None], 1.0)
    # HSV -> RGB
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    choices = torch.stack([torch.stack(c, 0) for c in
                           [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)  # [6, 3, B, H, W]
    out = torch.gather(choices, 0, i[None, None].expand(1, 3, *i.shape))[0]
    return out.permute(1, 0, 2, 3).contiguous()


def gaussian_blur(x, sigma, kernel_size: int):
    """Per-image Gaussian blur, separable, one grouped convolution per direction."""
    b, c, h, w = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(pos[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the side, odd (23 px at 224, as in the paper)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def photometric(x: torch.Tensor, aug: ViewAugmentation) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarisation with per-image randomness."""
    b, dev = x.shape[0], x.device
    u = torch.rand(b, 8, device=dev)
    jitter = u[:, 0] < aug.jitter_p
    one = torch.ones(b, device=dev)

    def factor(strength, col):  # U[1 - s, 1 + s] where jittered, identity elsewhere
        f = 1 - strength + 2 * strength * u[:, col]
        return torch.where(jitter, f.clamp(min=0), one)

    ops = [
        (aug.brightness, lambda t: adjust_brightness(t, factor(aug.brightness, 1))),
        (aug.contrast, lambda t: adjust_contrast(t, factor(aug.contrast, 2))),
        (aug.saturation, lambda t: adjust_saturation(t, factor(aug.saturation, 3))),
        (aug.hue, lambda t: adjust_hue(t, torch.where(jitter, aug.hue * (2 * u[:, 4] - 1), 0 * one))),
    ]
    for i in torch.randperm(4).tolist():  # one order per batch (see module docstring)
        strength, op = ops[i]
        if strength > 0 and aug.jitter_p > 0:
            x = op(x)
    if aug.grayscale_p > 0:
        to_gray = (u[:, 5] < aug.grayscale_p)[:, None, None, None]
        x = torch.where(to_gray, grayscale(x).expand_as(x), x)
    if aug.blur_p > 0:
        lo, hi = aug.blur_sigma
        sigma = torch.where(u[:, 6] < aug.blur_p, lo + (hi - lo) * torch.rand(b, device=dev), one * 1e-3)
        x = gaussian_blur(x, sigma, blur_kernel_size(x.shape[-1]))
    if aug.solarize_p > 0:
        x = torch.where((u[:, 7] < aug.solarize_p)[:, None, None, None] & (x >= 0.5), 1 - x, x)
    return x


class BatchAugment(torch.nn.Module):
    """uint8 batch -> two normalised float views, everything on the input's device.

    `crop=True` also does the random resized crop and flip (for images held in memory);
    `crop=False` expects two views already cropped by the data-loader workers: [B, 2, 3, S, S].
    """

    def __init__(self, views: tuple[ViewAugmentation, ViewAugmentation], size: int, mean, std,
                 crop: bool = True):
        super().__init__()
        self.views, self.size, self.crop = views, size, crop
        # Buffers move with .to(device): no host-to-device copy of the constants per batch.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for k, aug in enumerate(self.views):
            if self.crop:
                x = crop_resize_batch(images, self.size, aug)
            else:
                x = images[:, k].float().div_(255.0)
            x = photometric(x, aug)
            out.append(normalize_unit_tensor(x, self.mean, self.std).contiguous(memory_format=torch.channels_last))
        return out[0], out[1]
