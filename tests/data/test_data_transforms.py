"""Device-side preprocessing against independent references (numpy, colorsys)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from multifair.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _hsv_to_rgb,
    _rgb_to_hsv,
    colour_jitter,
    fundus_uint8,
    image_to_model,
    oct_uint8,
    released_preprocess_numpy,
    slice_indices,
    to_model,
    volume_to_model,
)


def test_slice_indices_match_the_released_choice():
    np.testing.assert_array_equal(
        slice_indices(200, 10), [0, 22, 44, 66, 88, 110, 132, 154, 176, 199]
    )
    np.testing.assert_array_equal(slice_indices(128, 10), np.linspace(0, 127, 10).astype(int))
    assert slice_indices(1, 3).tolist() == [0, 0, 0]


def test_volume_zscore_per_slice_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
    x[1, 2] = 7  # a constant slice: eps keeps it finite (zeros)
    got = volume_to_model(torch.from_numpy(x)).numpy()
    xf = x.astype(np.float64)
    mean = xf.mean(axis=(2, 3), keepdims=True)
    std = xf.std(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got, (xf - mean) / (std + 1e-6), rtol=1e-4, atol=1e-4)
    assert np.all(got[1, 2] == 0)


def test_image_eval_is_gray_to_rgb_and_imagenet_normalisation():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(2, 1, 5, 5), dtype=np.uint8)
    got = image_to_model(torch.from_numpy(x), channels=3, train=True, augment=False).numpy()
    expected = (x / 255.0 - np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / np.array(
        IMAGENET_STD
    ).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # eval never augments, even with augment on
    a = image_to_model(torch.from_numpy(x), 3, train=False, augment=True)
    torch.testing.assert_close(a, torch.from_numpy(expected).float())


def test_train_augmentation_flips_and_jitters_reproducibly():
    x = torch.arange(4 * 6 * 6, dtype=torch.float32).remainder(256).to(torch.uint8).view(4, 1, 6, 6)
    gen = torch.Generator().manual_seed(3)
    a = image_to_model(x.repeat(8, 1, 1, 1), 3, train=True, augment=True, generator=gen)
    b = image_to_model(
        x.repeat(8, 1, 1, 1),
        3,
        train=True,
        augment=True,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(a, b)
    plain = image_to_model(x.repeat(8, 1, 1, 1), 3, train=False, augment=True)
    changed = (a - plain).abs().flatten(1).amax(1) > 1e-4
    assert 0 < changed.sum() < 32  # most samples change (flip p=.5, jitter p=.8), not all


def test_hsv_roundtrip_matches_colorsys():
    rng = np.random.default_rng(2)
    rgb = rng.random((50, 3)).astype(np.float32)
    hsv = _rgb_to_hsv(torch.from_numpy(rgb).view(50, 3, 1, 1)).view(50, 3).numpy()
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    np.testing.assert_allclose(hsv, ref, atol=1e-5)
    back = _hsv_to_rgb(torch.from_numpy(hsv).view(50, 3, 1, 1)).view(50, 3).numpy()
    np.testing.assert_allclose(back, rgb, atol=1e-5)


def test_colour_jitter_on_gray_keeps_gray_and_range():
    x = torch.rand(16, 1, 4, 4).expand(-1, 3, -1, -1).contiguous()
    out = colour_jitter(x, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    # saturation and hue leave a gray image gray: the three channels stay equal
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-5, rtol=0)


def test_cpu_half_rejects_bad_pixels_and_shapes():
    from multifair.data.formats import BadValue

    with pytest.raises(BadValue, match=r"outside 0\.\.255"):
        fundus_uint8(np.full((8, 8), 300.0), 8)
    with pytest.raises(BadValue, match="not a 2-D image"):
        fundus_uint8(np.zeros((2, 8, 8, 8)), 8)
    with pytest.raises(BadValue, match="not a volume"):
        oct_uint8(np.zeros((8, 8), np.uint8), 3, 8)
    # float 0..255 fundus rounds to the same uint8 as the uint8 file
    img = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    torch.testing.assert_close(fundus_uint8(img.astype(np.float64), 8), fundus_uint8(img, 8))


def test_cached_uint8_path_matches_released_float_pipeline():
    """uint8 storage costs at most half a gray level before the z-score / normalisation."""
    rng = np.random.default_rng(4)
    fundus = rng.integers(0, 256, (40, 40)).astype(np.uint8)
    volume = rng.integers(0, 256, (12, 40, 40)).astype(np.uint8)
    ref_f, ref_v = released_preprocess_numpy(fundus, volume, size=56, slices=4)
    batch = {"fundus": fundus_uint8(fundus, 56)[None], "oct": oct_uint8(volume, 4, 56)[None]}
    out = to_model(batch, {"fundus": "image", "oct": "volume"}, "cpu", train=False)
    assert (out["fundus"][0] - ref_f).abs().max() < 0.5 / 255 / min(IMAGENET_STD) + 1e-4
    assert (out["oct"][0] - ref_v).abs().max() < 0.05
