"""Any-resolution SigLIP2 ViT with packed attention (no class token).

Every image is patchified at its own size (zero-padded right/bottom to the patch multiple), gets
the learned position grid resized to its patch grid, and all images are concatenated into one
sequence whose attention is block-diagonal (see ``viq.nn.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from viq.config import ViTConfig
from viq.nn.attention import Segments
from viq.nn.layers import AttentionPool, Block


@dataclass(frozen=True)
class Packing:
    """Where each image lives in a packed token sequence."""

    grids: tuple[tuple[int, int], ...]  # (h, w) patch grid per image

    @property
    def segments(self) -> Segments:
        return Segments(tuple(h * w for h, w in self.grids))

    def split(self, x: torch.Tensor, factor: int = 1) -> list[torch.Tensor]:
        return list(x.split([h * w * factor for h, w in self.grids], dim=0))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=True)

    def patches(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3, H, W) -> its patches side by side, (3, p, h * w * p) in raster order, and the grid.
        Pads right/bottom with 0 (mid grey) to the patch multiple first."""
        p = self.patch
        c, hgt, wid = pixels.shape
        pixels = F.pad(pixels, (0, (p - wid % p) % p, 0, (p - hgt % p) % p))
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        return pixels.reshape(c, h, p, w, p).permute(0, 2, 1, 3, 4).reshape(c, p, h * w * p), (h, w)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3, H, W) -> (h * w, C) raster-order tokens and the grid."""
        tokens, grids = self.embed_many([pixels])
        return tokens, grids[0]

    def embed_many(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Every image's patches through ONE convolution call: (sum h * w, C) and the grids.

        A stride-p convolution sees each patch alone, so convolving all patches laid side by side in
        one p-high strip gives the same values (bit for bit, tested) as convolving each padded image,
        without a call per image (which dominates for many small images); the strip is also the
        fastest layout measured for oneDNN (4x a batch of p x p patches)."""
        pieces = [self.patches(img) for img in images]
        strip = pieces[0][0] if len(pieces) == 1 else torch.cat([x for x, _ in pieces], dim=-1)
        return self.proj(strip[None])[0, :, 0].T, [g for _, g in pieces]


class AnyResViT(nn.Module):
    def __init__(self, cfg: ViTConfig, with_pool: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.patch, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid ** 2, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.qkv_bias)
                                    for _ in range(cfg.depth))
        self.with_pool = cfg.attn_pool if with_pool is None else with_pool
        if self.with_pool:
            self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
            self.attn_pool = AttentionPool(cfg.width, cfg.attn_pool_heads or cfg.heads,
                                           cfg.attn_pool_mlp_hidden or cfg.mlp_hidden)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned grid resized to (h, w): bilinear, align_corners=False, no antialias (as ViQ)."""
        g = self.cfg.pos_grid
        pe = self.pos_embed[0]
        if tuple(grid) == (g, g):
            return pe
        pe2d = pe.T.contiguous().view(1, -1, g, g)
        pe2d = F.interpolate(pe2d, size=grid, mode="bilinear", align_corners=False)
        return pe2d.view(-1, grid[0] * grid[1]).T

    def embed(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, Packing]:
        """Patchify + position-embed every image and concatenate: (sum N_i, C)."""
        dtype = self.pos_embed.dtype
        tokens, grids = self.patch_embed.embed_many([img.to(dtype) for img in images])
        pos = self._positions(grids)
        return tokens + pos, Packing(tuple(grids))

    def _positions(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """The position embeddings of every image, concatenated; each distinct grid of the batch is
        resized once (many small images share a few grids)."""
        if len(grids) == 1:
            return self.position_embedding(grids[0])
        resized = {g: self.position_embedding(g) for g in dict.fromkeys(grids)}
        return torch.cat([resized[g] for g in grids])

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, Packing]:
        """Images (3, H, W) in [-1, 1] -> packed tokens of the last block (no final norm)."""
        x, packing = self.embed(images)
        segments = packing.segments
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, segments, use_reentrant=False)
            else:
                x = blk(x, segments)
        return x, packing

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm + attention pool of one image's tokens (N, C) -> (C,)."""
        return self.attn_pool(self.norm(tokens))
