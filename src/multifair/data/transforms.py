"""Preprocessing in two halves.

CPU half (in the loader workers, or once by `multifair data prepare`): exactly the tensors
the model reads, as uint8 - a fundus resized to `image_size` (1 or 3 channels, as stored) and
`oct_slices` OCT slices at linspace(0, D-1, K), bilinear-resized. This is what the cache holds.

Device half (`to_model`, called by `DataBundle.to_device` after the uint8 batch reaches the
GPU): the released MultiFair preprocessing that needs floats -
fundus: gray -> RGB, train-only horizontal flip and colour jitter (0.4, 0.4, 0.4, 0.1, p=0.8),
ImageNet normalisation; OCT: per-slice z-score (eps 1e-6). Doing it on the device keeps the
host->device copy at 1 byte per pixel and costs the GPU microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multifair.data.formats import BadValue

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}
ZSCORE_EPS = 1e-6


# ---- CPU half: stored arrays -> uint8 tensors the model reads ---------------------------------
def _check_values(arr: np.ndarray, key: str) -> None:
    """Pixel values must be finite and within 0..255 (the datasets' range for any dtype)."""
    if arr.dtype == np.uint8:
        return
    if arr.dtype.kind not in "biuf":
        raise BadValue(key, f"pixel dtype {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = arr[~np.isfinite(arr)].flat[0]
        raise BadValue(key, f"non-finite pixel value {float(bad)}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.5 or hi > 255.5:
        raise BadValue(key, f"pixel values span {lo:g}..{hi:g}, outside 0..255")


def _resize_uint8(x: Tensor, size: int) -> Tensor:
    """(N, H, W) float or uint8 -> (N, size, size) uint8, bilinear (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        out = x.float() if x.dtype != torch.uint8 else x
    else:
        shrink = x.shape[-2] > size or x.shape[-1] > size
        out = F.interpolate(
            x.float()[None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )[0]
    if out.dtype == torch.uint8:
        return out.contiguous()
    return out.round_().clamp_(0, 255).to(torch.uint8)


def fundus_uint8(arr: np.ndarray, size: int, key: str = "slo_fundus") -> Tensor:
    """A stored fundus -> (C, size, size) uint8; C = 1 for grayscale, 3 for RGB input.

    Accepts (H, W) grayscale, (H, W, 3|4) or (3, H, W) colour, uint8 or float in 0..255.
    """
    if arr.ndim == 2:
        planes = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
        planes = np.moveaxis(arr[..., :3], -1, 0)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3):
        planes = arr
    else:
        raise BadValue(key, f"shape {arr.shape} is not a 2-D image (H, W) or (H, W, 3)")
    if min(planes.shape[-2:]) < 2:
        raise BadValue(key, f"shape {arr.shape} is too small for an image")
    _check_values(planes, key)
    return _resize_uint8(torch.from_numpy(np.ascontiguousarray(planes)), size)


def slice_indices(depth: int, k: int) -> np.ndarray:
    """The released OCT slice choice: linspace(0, D-1, K), truncated to integers."""
    return np.linspace(0, depth - 1, k).astype(np.int64)


def oct_uint8(arr: np.ndarray, slices: int, size: int, key: str = "oct_bscans") -> Tensor:
    """A stored OCT volume (D, H, W) -> (K, size, size) uint8: K slices at linspace(0, D-1, K)."""
    if arr.ndim != 3:
        raise BadValue(key, f"shape {arr.shape} is not a volume (D, H, W)")
    if min(arr.shape) < 1 or min(arr.shape[1:]) < 2:
        raise BadValue(key, f"shape {arr.shape} is too small for a volume")
    picked = arr[slice_indices(arr.shape[0], slices)]  # (K, H, W)
    _check_values(picked, key)
    return _resize_uint8(torch.from_numpy(np.ascontiguousarray(picked)), size)


# ---- device half: uint8 batch -> float tensors with the released normalisation ----------------
def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601-2, as PIL and torchvision)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # rows: sector 0..5 -> (r, g, b)
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None]).squeeze(1)
    return torch.stack([r, g, b], 1)


def _uniform(n: int, lo: float, hi: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    u = torch.rand(n, device=like.device, generator=gen, dtype=like.dtype)
    return (lo + (hi - lo) * u).view(n, 1, 1, 1)


def colour_jitter(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1) applied with p=0.8, batched on the device.

    x: (B, 3, H, W) float in [0, 1]. Each sample draws its own factors; the order of the four
    operations is drawn once per batch (torchvision draws it per image).
    """
    n = x.shape[0]
    out = x
    cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
    order = torch.randperm(4, generator=cpu_generator)
    for op in order.tolist():
        if op == 0:
            f = _uniform(n, 1 - JITTER["brightness"], 1 + JITTER["brightness"], x, generator)
            out = (out * f).clamp(0, 1)
        elif op == 1:
            f = _uniform(n, 1 - JITTER["contrast"], 1 + JITTER["contrast"], x, generator)
            mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (f * out + (1 - f) * mean).clamp(0, 1)
        elif op == 2:
            f = _uniform(n, 1 - JITTER["saturation"], 1 + JITTER["saturation"], x, generator)
            out = (f * out + (1 - f) * _gray(out)).clamp(0, 1)
        else:
            shift = _uniform(n, -JITTER["hue"], JITTER["hue"], x, generator).view(n, 1, 1)
            hsv = _rgb_to_hsv(out)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            out = _hsv_to_rgb(hsv)
    apply = torch.rand(n, device=x.device, generator=generator) < JITTER["p"]
    return torch.where(apply.view(n, 1, 1, 1), out, x)


def image_to_model(
    x: Tensor, channels: int, train: bool, augment: bool, generator: torch.Generator | None = None
) -> Tensor:
    """uint8 (B, C, H, W) -> float (B, channels, H, W), released fundus preprocessing."""
    x = x.float().div_(255.0)  # (B, C, H, W) in [0, 1]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = _gray(x)
    if train and augment:
        n = x.shape[0]
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        if x.shape[1] == 3:
            x = colour_jitter(x, generator)
    if channels == 3:
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    else:
        mean = x.new_tensor([sum(IMAGENET_MEAN) / 3]).view(1, 1, 1, 1)
        std = x.new_tensor([sum(IMAGENET_STD) / 3]).view(1, 1, 1, 1)
    return (x - mean) / std


def volume_to_model(x: Tensor) -> Tensor:
    """uint8 (B, K, H, W) -> float (B, K, H, W), each slice z-scored (eps 1e-6)."""
    x = x.float()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / (std + ZSCORE_EPS)


def to_model(
    batch: Mapping[str, Any],
    kinds: Mapping[str, str],
    device: torch.device | str,
    train: bool,
    channels: int = 3,
    augment: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Move a collated batch to `device` and finish its preprocessing there.

    `kinds` maps modality -> "image" | "volume" | "tabular" | "text". Non-modality entries
    (label, group, attributes, index) are moved as they are; text and ids stay lists.
    """
    device = torch.device(device)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(device, non_blocking=True)
        elif isinstance(value, Mapping):
            value = {
                k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in value.items()
            }
        kind = kinds.get(key)
        if kind == "image":
            value = image_to_model(value, channels, train, augment, generator)
        elif kind == "volume":
            value = volume_to_model(value)
        elif kind == "tabular":
            value = value.float()
        out[key] = value
    return out


def released_preprocess_numpy(
    fundus: np.ndarray, oct_volume: np.ndarray, size: int = 224, slices: int = 10
) -> tuple[Tensor, Tensor]:
    """The released per-sample CPU pipeline in float32 (benchmark reference only).

    fundus -> RGB float -> resize -> ImageNet normalisation; OCT -> K slices -> float resize ->
    per-slice z-score. Returns ((3, S, S), (K, S, S)) float32 tensors.
    """
    f = torch.from_numpy(np.ascontiguousarray(fundus, dtype=np.float32))[None, None] / 255.0
    f = F.interpolate(
        f.expand(1, 3, -1, -1), size=(size, size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    f = ((f - mean) / std)[0]
    idx = slice_indices(oct_volume.shape[0], slices)
    v = torch.from_numpy(oct_volume[idx].astype(np.float32))[None]
    v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)[0]
    v = (v - v.mean(dim=(-2, -1), keepdim=True)) / (v.std(dim=(-2, -1), keepdim=True) + ZSCORE_EPS)
    return f, v


def stack_uint8(items: Sequence[Tensor]) -> Tensor:
    """Stack per-sample uint8 tensors into one batch tensor (B, ...)."""
    return torch.stack(list(items), 0)
