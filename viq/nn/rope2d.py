"""Golden-gate 2D RoPE: each frequency measures position along its own direction in the plane.

Directions advance by a fixed angle (the golden angle by default) across frequencies and across the
4 slots of a patch, so the 4 codes of one patch see the patch's position from different directions.
Positions are aspect-normalised and zero-centred, so any (h, w) grid is valid.
"""

from __future__ import annotations

import math

import torch

from viq.config import RopeConfig


def rope_frequencies(head_dim: int, slots: int, cfg: RopeConfig) -> torch.Tensor:
    """Frequency vectors, (slots, head_dim // 2, 2) float32: magnitude times (cos, sin) of the direction."""
    n_freqs = head_dim // 2
    n_zero = round(cfg.p_zero_freqs * n_freqs)
    omega = torch.cat((torch.zeros(n_zero),
                       cfg.min_freq * (cfg.max_freq / cfg.min_freq) ** torch.linspace(0, 1, n_freqs - n_zero)))
    phi = torch.arange(slots * n_freqs).reshape(slots, n_freqs) * cfg.direction_spacing
    directions = torch.stack((torch.cos(phi), torch.sin(phi)), dim=-1)
    return omega.unsqueeze(-1) * directions


def grid_angles(freqs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Rotation angles for an (h, w) patch grid, raster order: (h * w, slots, head_dim // 2), float32."""
    h, w = grid
    xlim, ylim = math.sqrt(w / h), math.sqrt(h / w)
    x = torch.linspace(-xlim, xlim, w).reshape(1, w).expand(h, w)
    y = torch.linspace(-ylim, ylim, h).reshape(h, 1).expand(h, w)
    pos = torch.stack((x, y), dim=-1).reshape(h, w, 1, 1, 2)
    theta = (freqs * pos).sum(dim=-1)
    return theta.reshape(h * w, freqs.shape[0], freqs.shape[1])


def apply_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate channel f together with f + d/2 (half-split pairing). x: (..., d); theta: (..., d/2).

    theta is rounded to x's dtype BEFORE cos/sin, as the reference does (it matters in bf16).
    """
    theta = theta.to(x.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
