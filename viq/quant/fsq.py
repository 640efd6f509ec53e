"""Finite scalar quantisation (FSQ) with ViQ's bound and index order.

Each code dimension i with L_i levels is squashed by tanh into L_i bins and rounded (half to
even). The index of a code vector is sum_i level_i * prod(L_0..L_{i-1}) (first dim least
significant). All bound/round/index math runs in float32 and integers: bf16 cannot even hold the
index 15360 exactly, and rounding near bin edges must not depend on the run dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


class FSQ(nn.Module):
    """Bound, round and convert between codes (values in [-1, 1]) and integer indices."""

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        self.levels_list = list(levels)
        self.eps = eps
        # Built on the CPU even when the model is created on the meta device: these are not loaded.
        levels_t = torch.tensor(levels, dtype=torch.int64, device="cpu")
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), dtype=torch.int64, device="cpu"), dim=0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels_list)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels_list)

    def _consts(self, device):
        levels = self.levels.to(device)
        half_l = (levels.to(torch.int32) - 1) * (1 + self.eps) / 2  # float32, as the reference computes it
        offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(device)
        shift = (offset / half_l).atanh()
        return half_l, offset, shift

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z (float32) so that rounding yields L_i levels per dim."""
        half_l, offset, shift = self._consts(z.device)
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> codes (..., d) in float32, values (level - L//2) / (L//2); straight-through."""
        z = z.float()
        half_width = (self.levels // 2).to(z.device)
        return _round_ste(self.bound(z)) / half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half_width = (self.levels // 2).to(codes.device)
        level = torch.round(codes.float() * half_width).to(torch.int64) + half_width
        return (level * self.basis.to(codes.device)).sum(dim=-1)

    def indices_to_levels(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.to(torch.int64).unsqueeze(-1)
        return (idx // self.basis.to(idx.device)) % self.levels.to(idx.device)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        half_width = (self.levels // 2).to(indices.device)
        return (self.indices_to_levels(indices) - half_width) / half_width

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> int64 indices (...)."""
        return self.codes_to_indices(self.quantize(z))

    def codebook(self) -> torch.Tensor:
        """The implicit codebook: (codebook_size, d) float32, row = code of that index."""
        if self.levels.is_meta:
            return torch.empty(self.codebook_size, self.dim, device="meta")
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.levels.device))
