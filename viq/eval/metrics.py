"""Reconstruction and code metrics: PSNR, SSIM, codebook usage, bits per pixel.

Images are uint8 RGB arrays (H, W, 3) (numpy or torch). Conventions:
  * PSNR = 10 log10(255^2 / MSE), the MSE over all pixels and the 3 channels of one image, in float64;
    identical images give ``inf``.
  * SSIM (Wang et al. 2004): computed PER RGB CHANNEL on 0..255 values and averaged over the channels
    (not on luminance); 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population
    (not sample) statistics, and only windows that fit inside the image ("valid"). This equals
    skimage's ``structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`` (checked to 1e-15 during development; skimage is not
    a dependency). Images smaller than 11 pixels use the largest odd
    window that fits.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from viq.errors import ConfigError


def as_uint8(image) -> np.ndarray:
    """A (H, W, 3) uint8 numpy array from numpy, torch or PIL."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"expected a uint8 RGB image (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_uint8(a), as_uint8(b)
    if a.shape != b.shape:
        raise ConfigError(f"images differ in size: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 RGB images (``inf`` when identical)."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of two uint8 RGB images, per channel then averaged (see the module docstring)."""
    a, b = _pair(a, b)
    win = min(window, a.shape[0], a.shape[1])
    win -= 1 - win % 2  # odd
    g = _gaussian(win, sigma)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, win, win)

    def filt(x):  # depthwise "valid" Gaussian filter
        return F.conv2d(x, kernel, groups=3)

    x = torch.from_numpy(a).to(torch.float64).permute(2, 0, 1)[None]
    y = torch.from_numpy(b).to(torch.float64).permute(2, 0, 1)[None]
    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def _usage(counts: np.ndarray) -> dict:
    total = int(counts.sum())
    if total == 0:
        return {"codes": 0, "used": 0, "usage": 0.0, "perplexity": 0.0, "entropy_bits": 0.0}
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    used = int((counts > 0).sum())
    return {"codes": total, "used": used, "usage": used / counts.size, "perplexity": math.exp(entropy),
            "entropy_bits": entropy / math.log(2)}


def codebook_usage(codes: Sequence, codebook_size: int, slots: int = 4) -> dict:
    """Share of the codebook used, perplexity and entropy, over all codes and per slot.

    ``codes``: per image an int grid (h, w, slots). ``usage`` = distinct codes seen / codebook size
    (bounded by the number of codes seen: few images cannot use a large codebook). ``perplexity`` =
    exp(entropy of the empirical code distribution), from 1 (one code) to the codebook size (uniform).
    ``per_slot[j]`` is the same over slot j of every patch only.
    """
    if codebook_size < 1:
        raise ConfigError(f"codebook_size must be >= 1, got {codebook_size}")
    flat = []
    for c in codes:
        c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        if c.ndim != 3 or c.shape[-1] != slots:
            raise ConfigError(f"codes must have shape (h, w, {slots}), got {c.shape}")
        flat.append(c.reshape(-1, slots).astype(np.int64))
    allc = np.concatenate(flat) if flat else np.zeros((0, slots), dtype=np.int64)
    if allc.size and (allc.min() < 0 or allc.max() >= codebook_size):
        raise ConfigError(f"codes out of range [0, {codebook_size})")
    out = _usage(np.bincount(allc.reshape(-1), minlength=codebook_size))
    out["codebook_size"] = int(codebook_size)
    out["per_slot"] = [_usage(np.bincount(allc[:, j], minlength=codebook_size)) for j in range(slots)]
    return out


def bits_per_pixel(grids: Sequence[tuple[int, int]], codebook_size: int,
                   original_sizes: Optional[Sequence[tuple[int, int]]] = None, patch: int = 16,
                   slots: int = 4) -> dict:
    """Fixed-length code rate: log2(codebook) bits x ``slots`` codes per patch, per pixel.

    ``bpp_padded`` divides by the padded image area (16h x 16w); ``bpp_original`` by the area of the
    images as given (``original_sizes`` as (height, width)), when known.
    """
    bits_per_code = math.log2(codebook_size)
    bits = sum(bits_per_code * slots * h * w for h, w in grids)
    padded = sum(patch * h * patch * w for h, w in grids)
    out = {"bits_per_code": bits_per_code, "bits": bits, "bpp_padded": bits / padded if padded else 0.0,
           "bpp_original": None}
    if original_sizes is not None:
        if len(original_sizes) != len(grids):
            raise ConfigError(f"{len(original_sizes)} original sizes for {len(grids)} code grids")
        area = sum(int(h) * int(w) for h, w in original_sizes)
        out["bpp_original"] = bits / area if area else 0.0
    return out
