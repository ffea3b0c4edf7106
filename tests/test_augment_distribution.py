"""The batched (GPU-path) augmentations against the per-image CPU ones, in distribution.

trainer.augment's batched operations draw every image's parameters at once on the batch's
device; the per-image references are the data-loader worker's crop (crop_resize_pil, PIL) and
torchvision's own per-image transforms (RandomApply(ColorJitter), RandomGrayscale,
RandomSolarize), as the BYOL recipe writes them. On a fixed seed and a few thousand samples
each, the rates (flip, jitter, grayscale, solarise), the crop geometry (area share, aspect
ratio, centre) and the output statistics must agree within a few standard errors. Everything
here runs on CPU tensors; one test repeats the batched statistics on CUDA where there is one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from trainer.augment import ViewAugmentation, byol_views, crop_resize_batch, crop_resize_pil, photometric

N = 3000      # samples per side (crops)
N_PHOTO = 1500  # samples per side (photometric: torchvision's per-image loop is the slow part)
SIDE = 48     # source image side
OUT = 16      # crop output side


def coordinate_image() -> torch.Tensor:
    """uint8 [3, SIDE, SIDE]: red encodes x, green encodes y, blue is flat, so that a crop's box
    and flip can be read back from its pixels."""
    ramp = (torch.arange(SIDE, dtype=torch.float64) + 0.5) / SIDE * 255
    x = ramp[None, :].expand(SIDE, SIDE)
    y = ramp[:, None].expand(SIDE, SIDE)
    return torch.stack([x, y, torch.full_like(x, 128)]).round().to(torch.uint8)


def crop_geometry(crops: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float [N, 3, S, S] crops of coordinate_image in [0, 1] -> per-crop width and height
    shares of the image, centre and flip, read from the ramps."""
    red, green = crops[:, 0], crops[:, 1]
    left_col, right_col = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top_row, bottom_row = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    # The outer output pixels sit half an output pixel inside the crop's edges.
    w = (right_col - left_col).abs() * OUT / (OUT - 1)
    h = (bottom_row - top_row) * OUT / (OUT - 1)
    return {"w": w, "h": h, "area": w * h, "log_aspect": torch.log(w / h),
            "cx": red.mean((1, 2)), "cy": green.mean((1, 2)), "flip": (right_col < left_col).float()}


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, what: str, sigmas: float = 4.5):
    """Means within `sigmas` standard errors, stds within 10%, quartiles close."""
    a, b = a.double(), b.double()
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= sigmas * se + 1e-9, f"{what}: mean {a.mean():.4f} vs {b.mean():.4f}"
    assert abs(a.std() - b.std()) <= 0.1 * max(a.std(), b.std()) + 1e-6, \
        f"{what}: std {a.std():.4f} vs {b.std():.4f}"
    qa, qb = np.quantile(a.numpy(), [0.25, 0.5, 0.75]), np.quantile(b.numpy(), [0.25, 0.5, 0.75])
    spread = float(np.quantile(np.concatenate([a.numpy(), b.numpy()]), 0.9)
                   - np.quantile(np.concatenate([a.numpy(), b.numpy()]), 0.1)) + 1e-9
    assert np.all(np.abs(qa - qb) <= 0.08 * spread), f"{what}: quartiles {qa} vs {qb}"


def assert_rate(x: torch.Tensor, p: float, what: str):
    rate = x.float().mean().item()
    assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / len(x)), f"{what}: rate {rate:.4f}, expected {p}"


@pytest.mark.parametrize("aug", [ViewAugmentation(), ViewAugmentation(crop_scale=(0.2, 1.0))],
                         ids=["scale-0.08", "scale-0.2"])
def test_batched_crop_matches_the_worker_crop_in_distribution(aug):
    torch.manual_seed(0)
    image = coordinate_image()
    batched = crop_resize_batch(image[None].expand(N, -1, -1, -1), OUT, aug)
    g = torch.Generator().manual_seed(0)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    per_image = torch.stack([crop_resize_pil(pil, OUT, aug, g) for _ in range(N)]).float() / 255
    a, b = crop_geometry(batched), crop_geometry(per_image)
    for key in ("area", "log_aspect", "cx", "cy"):
        assert_same_distribution(a[key], b[key], key)
    assert_rate(a["flip"], aug.flip_p, "batched flip")
    assert_rate(b["flip"], aug.flip_p, "per-image flip")
    # and both follow RandomResizedCrop's law: area share within the scale range, aspect within ratio
    for geo in (a, b):
        assert geo["area"].min() >= aug.crop_scale[0] * 0.8 and geo["area"].max() <= 1.05
        assert geo["log_aspect"].abs().max() <= math.log(4 / 3) + 0.15


def test_batched_crop_matches_torchvision_random_resized_crop():
    """The crop box law against torchvision's RandomResizedCrop.get_params itself."""
    torch.manual_seed(1)
    image = coordinate_image()
    aug = ViewAugmentation()
    batched = crop_geometry(crop_resize_batch(image[None].expand(N, -1, -1, -1), OUT, aug))
    from torchvision.transforms import RandomResizedCrop
    boxes = torch.tensor([RandomResizedCrop.get_params(image, aug.crop_scale, aug.crop_ratio) for _ in range(N)],
                         dtype=torch.float64)  # (top, left, h, w)
    ref_area = boxes[:, 2] * boxes[:, 3] / SIDE ** 2
    ref_log_aspect = torch.log(boxes[:, 3] / boxes[:, 2])
    assert_same_distribution(batched["area"], ref_area, "area vs torchvision")
    assert_same_distribution(batched["log_aspect"], ref_log_aspect, "log aspect vs torchvision")


def colourful_batch(n: int, seed: int) -> torch.Tensor:
    """Float [n, 3, 8, 8] in [0, 1]: smooth random colours, no two channels equal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.1
    return (base + 0.05 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1)


def torchvision_view(aug: ViewAugmentation) -> T.Compose:
    """The per-image reference of trainer.augment.photometric, written with torchvision."""
    return T.Compose([
        T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p),
        T.RandomGrayscale(p=aug.grayscale_p),
        T.RandomSolarize(threshold=0.5, p=aug.solarize_p),
    ])


def is_gray(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-4) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-4)


def test_photometric_rates_match_torchvision():
    torch.manual_seed(2)
    x = colourful_batch(N_PHOTO, seed=0)
    # jitter alone: the share of images left unchanged is 1 - jitter_p
    only_jitter = ViewAugmentation(grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    changed_b = (photometric(x.clone(), only_jitter) - x).abs().amax((1, 2, 3)) > 1e-6
    ref = torchvision_view(only_jitter)
    changed_t = torch.stack([(ref(img) - img).abs().amax() > 1e-6 for img in x])
    assert_rate(changed_b, only_jitter.jitter_p, "batched jitter")
    assert_rate(changed_t, only_jitter.jitter_p, "torchvision jitter")
    # grayscale alone
    only_gray = ViewAugmentation(jitter_p=0.0, grayscale_p=0.2, blur_p=0.0, solarize_p=0.0)
    assert_rate(is_gray(photometric(x.clone(), only_gray)), 0.2, "batched grayscale")
    ref = torchvision_view(only_gray)
    assert_rate(is_gray(torch.stack([ref(img) for img in x])), 0.2, "torchvision grayscale")
    # solarisation alone, on images whose every pixel is bright: inverted ones become dark
    bright = 0.6 + 0.3 * x
    only_solar = ViewAugmentation(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.2)
    assert_rate(photometric(bright.clone(), only_solar).amax((1, 2, 3)) < 0.5, 0.2, "batched solarise")
    ref = torchvision_view(only_solar)
    assert_rate(torch.stack([ref(img) for img in bright]).amax((1, 2, 3)) < 0.5, 0.2, "torchvision solarise")


@pytest.mark.parametrize("view", [0, 1], ids=["T", "T-prime"])
def test_photometric_output_statistics_match_torchvision(view):
    """The whole photometric chain of the paper's T and T' (blur off, as for small images):
    per-image mean brightness, per-image colour spread and the per-channel means agree."""
    aug = byol_views(blur=False)[view]
    torch.manual_seed(3 + view)
    x = colourful_batch(N_PHOTO, seed=1)
    batched = photometric(x.clone(), aug)
    ref = torchvision_view(aug)
    torch.manual_seed(3 + view)
    per_image = torch.stack([ref(img) for img in x])
    assert_same_distribution(batched.mean((1, 2, 3)), per_image.mean((1, 2, 3)), "image mean")
    assert_same_distribution(batched.std((1, 2, 3)), per_image.std((1, 2, 3)), "image std")
    for c in range(3):
        assert_same_distribution(batched[:, c].mean((1, 2)), per_image[:, c].mean((1, 2)), f"channel {c} mean")
    assert_rate(is_gray(batched), aug.grayscale_p, "grayscale within the chain")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_augmentations_on_cuda_match_cpu_in_distribution():
    torch.manual_seed(4)
    image = coordinate_image()
    aug = byol_views(blur=True)[0]
    cpu = crop_geometry(crop_resize_batch(image[None].expand(N, -1, -1, -1), OUT, aug))
    gpu = crop_geometry(crop_resize_batch(image[None].expand(N, -1, -1, -1).cuda(), OUT, aug).cpu())
    for key in ("area", "log_aspect", "cx"):
        assert_same_distribution(cpu[key], gpu[key], key)
    x = colourful_batch(N, seed=2)
    a, b = photometric(x.clone(), aug), photometric(x.cuda(), aug).cpu()
    assert_same_distribution(a.mean((1, 2, 3)), b.mean((1, 2, 3)), "image mean")
