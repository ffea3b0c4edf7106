"""The batched BYOL augmentations: crops, colour operations and the two-view module."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import make_image

from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD
from trainer.augment import (
    BatchAugment,
    ViewAugmentation,
    adjust_hue,
    blur_kernel_size,
    byol_views,
    crop_resize_batch,
    crop_resize_pil,
    gaussian_blur,
    grayscale,
    photometric,
    sample_crop_boxes,
)

# No randomness but the crop: photometric operations all off.
PLAIN = ViewAugmentation(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def uint8_batch(b=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def unit_batch(b=3, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# -- BatchAugment ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 24])
def test_batch_augment_crop_gives_two_different_float_views(size):
    torch.manual_seed(0)
    aug = BatchAugment(byol_views(blur=True), size, CIFAR10_MEAN, CIFAR10_STD, crop=True)
    images = uint8_batch()
    before = images.clone()
    v1, v2 = aug(images)
    for v in (v1, v2):
        assert v.shape == (4, 3, size, size)
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
        # normalised: values of (x - mean) / std with x in [0, 1]
        assert v.min() >= (0 - max(CIFAR10_MEAN)) / min(CIFAR10_STD) - 1e-4
        assert v.max() <= (1 - min(CIFAR10_MEAN)) / min(CIFAR10_STD) + 1e-4
    assert (v1 - v2).abs().mean() > 0.05
    assert torch.equal(images, before)  # the input batch is left alone


def test_batch_augment_precropped_views():
    torch.manual_seed(1)
    s = 20
    aug = BatchAugment(byol_views(blur=False), s, CIFAR10_MEAN, CIFAR10_STD, crop=False)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 2, 3, s, s), generator=g, dtype=torch.uint8)
    v1, v2 = aug(images)
    assert v1.shape == v2.shape == (5, 3, s, s)
    assert v1.dtype == torch.float32 and torch.isfinite(v1).all() and torch.isfinite(v2).all()
    assert not torch.allclose(v1, v2)


def test_batch_augment_without_photometric_only_normalises_each_view():
    s = 16
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = BatchAugment((PLAIN, PLAIN), s, mean, std, crop=False)
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (3, 2, 3, s, s), generator=g, dtype=torch.uint8)
    v1, v2 = aug(images)
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(v1, (images[:, 0].float() / 255 - m) / sd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, (images[:, 1].float() / 255 - m) / sd, rtol=1e-5, atol=1e-5)


# -- crops -------------------------------------------------------------------------------------
def test_crop_resize_batch_full_box_is_identity_and_flip_mirrors():
    x = unit_batch(2, 16, 16)
    full = ViewAugmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(crop_resize_batch(x, 16, full), x, rtol=0, atol=1e-5)
    flipped = ViewAugmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(crop_resize_batch(x, 16, flipped), x.flip(-1), rtol=0, atol=1e-5)
    # uint8 input is scaled to [0, 1]
    u = uint8_batch(2, 16)
    torch.testing.assert_close(crop_resize_batch(u, 16, full), u.float() / 255, rtol=0, atol=1e-5)


def test_sample_crop_boxes_inside_image_and_area_in_scale_range():
    g = torch.Generator().manual_seed(0)
    n, H, W = 4000, 600, 800
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(torch.full((n,), H), torch.full((n,), W), scale, ratio, generator=g)
    assert boxes.shape == (n, 4)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels
    frac = (h * w) / (H * W)
    # fallback for this image would be the whole 600x800 image (ratio 4/3 is in range)
    is_fallback = (h == H) & (w == W)
    sampled = frac[~is_fallback]
    assert len(sampled) > 0.95 * n
    assert (sampled >= scale[0] * 0.99).all() and (sampled <= 1.0).all()
    aspect = (w / h)[~is_fallback]
    assert (aspect >= ratio[0] * 0.99).all() and (aspect <= ratio[1] * 1.01).all()
    # the whole range is used, not a fixed scale
    assert sampled.min() < scale[0] + 0.03 and sampled.max() > 0.85
    # the positions spread over the image too
    assert top.float().std() > 20 and left.float().std() > 20


def test_sample_crop_boxes_fallback_for_extreme_aspect_ratio():
    # A 10x100 strip cannot hold a crop of >= 99% of its area with a ratio in [3/4, 4/3]:
    # every attempt fails and the central crop with the ratio clamped to 4/3 is used.
    boxes = sample_crop_boxes(torch.tensor([10, 100]), torch.tensor([100, 10]), (0.99, 1.0), (3 / 4, 4 / 3),
                              generator=torch.Generator().manual_seed(0))
    assert boxes[0].tolist() == [0, 43, 10, 13]   # wide: full height, width round(10 * 4/3)
    assert boxes[1].tolist() == [43, 0, 13, 10]   # tall: full width, height round(10 / (3/4))


def test_sample_crop_boxes_deterministic_for_a_generator_seed():
    hs, ws = torch.tensor([36, 50, 64]), torch.tensor([44, 50, 20])
    a = sample_crop_boxes(hs, ws, (0.08, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(5))
    b = sample_crop_boxes(hs, ws, (0.08, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(5))
    c = sample_crop_boxes(hs, ws, (0.08, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_resize_pil_uint8_and_deterministic():
    image = make_image((200, 100, 50), seed=0)  # 44x36
    aug = byol_views()[0]
    a = crop_resize_pil(image, 24, aug, torch.Generator().manual_seed(7))
    b = crop_resize_pil(image, 24, aug, torch.Generator().manual_seed(7))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    others = [crop_resize_pil(image, 24, aug, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in others)
    # the colour survives the crop: the mean is close to the source image's
    assert abs(a.float().mean(dim=(1, 2))[0].item() - 200) < 15


def test_crop_resize_pil_full_crop_matches_plain_resize():
    image = make_image((10, 120, 240), seed=1, size=(32, 32))
    full = ViewAugmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    out = crop_resize_pil(image, 32, full, torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.from_numpy(np.array(image)).permute(2, 0, 1))


# -- colour operations -------------------------------------------------------------------------
def test_adjust_hue_zero_and_half_turns():
    x = unit_batch()
    b = x.shape[0]
    torch.testing.assert_close(adjust_hue(x, torch.zeros(b)), x, rtol=0, atol=1e-5)
    half = torch.full((b,), 0.5)
    twice = adjust_hue(adjust_hue(x, half), half)
    torch.testing.assert_close(twice, x, rtol=0, atol=1e-4)
    assert (adjust_hue(x, half) - x).abs().mean() > 0.05  # half a turn alone does change colours


def test_adjust_hue_matches_torchvision_per_image():
    x = unit_batch(3, 8, 8, seed=2)
    shifts = torch.tensor([0.1, -0.3, 0.25])
    out = adjust_hue(x, shifts)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shifts[i].item()), rtol=0, atol=1e-4)


def test_adjust_hue_keeps_grays():
    gray = torch.rand(2, 1, 5, 5).expand(2, 3, 5, 5).contiguous()
    torch.testing.assert_close(adjust_hue(gray, torch.tensor([0.3, -0.2])), gray, rtol=0, atol=1e-6)


def test_grayscale_luma_weights_and_photometric_equal_channels():
    x = unit_batch()
    g = grayscale(x)
    assert g.shape == (3, 1, 9, 11)
    # ITU-R 601-2 luma (PIL's weights; torchvision's 0.2989 differs by at most 1e-4)
    by_hand = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(g[:, 0], by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(g, TF.rgb_to_grayscale(x), rtol=0, atol=2e-4)
    aug = ViewAugmentation(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, solarize_p=0.0)
    out = photometric(x, aug)
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], g, rtol=0, atol=1e-6)


def test_solarize_always_inverts_bright_pixels():
    x = unit_batch(seed=3)
    aug = ViewAugmentation(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0)
    out = photometric(x, aug)
    expected = torch.where(x >= 0.5, 1 - x, x)
    assert torch.equal(out, expected)
    assert out.max() <= 0.5 + 1e-7


def test_photometric_identity_when_everything_is_off():
    x = unit_batch(seed=4)
    torch.testing.assert_close(photometric(x, PLAIN), x, rtol=0, atol=0)


def test_photometric_jitter_stays_in_unit_range():
    torch.manual_seed(0)
    x = unit_batch(8, 12, 12, seed=5)
    aug = ViewAugmentation(jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5,
                           grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    out = photometric(x, aug)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01


def test_gaussian_blur_keeps_constant_image_and_mean():
    x = torch.full((2, 3, 15, 15), 0.37)
    y = gaussian_blur(x, torch.tensor([0.5, 2.0]), 7)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    assert y.mean().item() == pytest.approx(0.37, abs=1e-6)


def test_gaussian_blur_smooths_and_tiny_sigma_is_identity():
    x = unit_batch(2, 16, 16, seed=6)
    near_id = gaussian_blur(x, torch.tensor([1e-3, 1e-3]), 5)
    torch.testing.assert_close(near_id, x, rtol=0, atol=1e-6)
    blurred = gaussian_blur(x, torch.tensor([2.0, 2.0]), 9)
    assert blurred.std() < 0.5 * x.std()  # noise is smoothed away
    assert blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.02)


def test_blur_kernel_size_is_odd_and_about_a_tenth():
    assert blur_kernel_size(224) == 23
    for s in (16, 32, 64, 96, 160, 224):
        k = blur_kernel_size(s)
        assert k % 2 == 1 and k >= 3 and abs(k - 0.1 * s) <= 1.5


def test_byol_views_are_the_papers_asymmetric_pair():
    t1, t2 = byol_views(blur=True, crop_scale=(0.2, 1.0))
    assert (t1.blur_p, t2.blur_p) == (1.0, 0.1)
    assert (t1.solarize_p, t2.solarize_p) == (0.0, 0.2)
    assert t1.crop_scale == t2.crop_scale == (0.2, 1.0)
    t1, t2 = byol_views(blur=False)
    assert t1.blur_p == t2.blur_p == 0.0
    assert math.isclose(t1.jitter_p, 0.8) and math.isclose(t1.grayscale_p, 0.2)
