"""The lightweight pixel decoder of the decoder stage: LLM features -> RGB, without the Qwen-Image VAE.

    features (T, C) packed ──adapter (Linear, LayerNorm, Blocks over the packed sequence)──▶ (T, D)
      per image: (1, D, h, w) ─stem conv─ResBlock─▶ [latent bottleneck: mean/logvar (KL), sample]
      ─mid ResBlocks─▶ hidden (REPA is aligned here, before the first upsample)
      ─log2(patch) × (nearest ×2, conv, ResBlocks)─▶ norm, SiLU, conv ─▶ RGB (3, 16h, 16w), target range [-1, 1]

Normalisation. ``norm: channel`` (the default) normalises groups of channels at each position; it
holds no statistics over space, so the conv part is local and tiled decoding with enough context
equals whole-image decoding up to float rounding. ``norm: group`` is torch's GroupNorm (statistics
over the whole image, as in VQGAN/LDM decoders); tiled decoding is then only approximate.

Memory of ``decode_tiled``: the adapter runs once over the image's h*w tokens (linear in h*w with
SDPA's memory-efficient kernels or flash-attn), then the conv stack, which holds the big activations
(channels x 16h x 16w), runs on one tile of (tile + 2*context)^2 patches at a time. Peak memory is
the adapter over h*w tokens + the conv stack over one tile + the output image (3 x 16h x 16w floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.errors import ConfigError
from viq.nn.layers import Block
from viq.config import PixelDecoderConfig  # noqa: F401  (re-exported)
from viq.nn.vit import Packing


def tiny_pixel_decoder_config(width: int = 64, **overrides) -> PixelDecoderConfig:
    """A tiny decoder for tests and CPU demos (same structure, small dimensions)."""
    kwargs = dict(width=width, adapter_dim=32, adapter_heads=4, adapter_blocks=1, channels=[32, 32, 16, 16, 8],
                  res_blocks=1, mid_blocks=1, latent_channels=4, groups=4, repa_hidden=32)
    kwargs.update(overrides)
    return PixelDecoderConfig(**kwargs)


class ChannelGroupNorm(nn.Module):
    """Normalise each group of channels at each position (no statistics over space)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        b, c, h, w = x.shape
        y = x.view(b, self.groups, c // self.groups, h, w)
        var, mean = torch.var_mean(y, dim=2, keepdim=True, unbiased=False)
        y = ((y - mean) * torch.rsqrt(var + self.eps)).view(b, c, h, w)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def make_norm(kind: str, groups: int, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(groups, channels, eps=1e-6)
    return ChannelGroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, groups: int):
        super().__init__()
        self.norm1 = make_norm(norm, groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = make_norm(norm, groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UpStage(nn.Module):
    """Nearest x2, conv, residual blocks."""

    def __init__(self, cin: int, cout: int, blocks: int, norm: str, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(cout, cout, norm, groups) for _ in range(blocks))

    def forward(self, x):
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        for blk in self.blocks:
            x = blk(x)
        return x


@dataclass
class DecoderOutput:
    """What one forward pass gives the losses (one entry per image)."""

    images: list[torch.Tensor]  # (3, 16h, 16w), not clamped; trained toward [-1, 1]
    hidden: list[torch.Tensor]  # (C0, h, w): the feature before the first upsample (REPA)
    repa: Optional[list[torch.Tensor]]  # (repa_dim, h, w) projected hidden, when the decoder has a projector
    mean: Optional[list[torch.Tensor]]  # (z, h, w) posterior mean, when the decoder has a bottleneck
    logvar: Optional[list[torch.Tensor]]


class PixelDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, ch = cfg.adapter_dim, cfg.channels
        self.adapter_in = nn.Linear(cfg.width, d)
        self.adapter_norm = nn.LayerNorm(d, eps=1e-6)
        self.adapter = nn.ModuleList(Block(d, cfg.adapter_heads, int(d * cfg.adapter_mlp_ratio))
                                     for _ in range(cfg.adapter_blocks))
        self.stem = nn.Conv2d(d, ch[0], 3, padding=1)
        self.stem_block = ResBlock(ch[0], ch[0], cfg.norm, cfg.groups)
        if cfg.latent_channels:
            self.to_moments = nn.Sequential(make_norm(cfg.norm, cfg.groups, ch[0]), nn.SiLU(),
                                            nn.Conv2d(ch[0], 2 * cfg.latent_channels, 1))
            self.from_latent = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(ch[0], ch[0], cfg.norm, cfg.groups) for _ in range(cfg.mid_blocks))
        self.up = nn.ModuleList(UpStage(ch[i], ch[i + 1], cfg.res_blocks, cfg.norm, cfg.groups)
                                for i in range(cfg.stages))
        self.norm_out = make_norm(cfg.norm, cfg.groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)
        if cfg.repa_dim:
            # REPA's projector: a 3-layer MLP applied at every position (1x1 convs).
            h = cfg.repa_hidden
            self.repa_proj = nn.Sequential(nn.Conv2d(ch[0], h, 1), nn.SiLU(), nn.Conv2d(h, h, 1), nn.SiLU(),
                                           nn.Conv2d(h, cfg.repa_dim, 1))

    # ---- pieces ---------------------------------------------------------------------------------
    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN's adaptive weight compares gradient norms at (VQGAN)."""
        return self.conv_out.weight

    def receptive_radius(self) -> float:
        """How far (in patches) the conv stack looks around a patch: sum over 3x3 convs of 1 / scale."""
        cfg = self.cfg
        r = 1 + 2  # stem conv + stem block
        r += 1 if cfg.latent_channels else 0  # from_latent (to_moments is 1x1)
        r += 2 * cfg.mid_blocks
        r += sum((1 + 2 * cfg.res_blocks) / 2 ** k for k in range(1, cfg.stages + 1))
        return r + 1 / 2 ** cfg.stages  # conv_out

    def default_context(self) -> int:
        """Patches of context around a tile that make tiled decoding exact with ``norm: channel``."""
        return math.ceil(self.receptive_radius()) + 1

    def adapt(self, features: torch.Tensor, packing: Packing) -> list[torch.Tensor]:
        """Packed features (T, C) -> per image a map (1, adapter_dim, h, w)."""
        if features.ndim != 2 or features.shape[1] != self.cfg.width:
            raise ConfigError(f"pixel decoder expects features (T, {self.cfg.width}), got {tuple(features.shape)}")
        total = sum(h * w for h, w in packing.grids)
        if features.shape[0] != total:
            raise ConfigError(f"{features.shape[0]} feature rows for grids {list(packing.grids)} ({total} patches)")
        x = self.adapter_norm(self.adapter_in(features.to(self.adapter_in.weight.dtype)))
        segments = packing.segments
        for blk in self.adapter:
            x = blk(x, segments)
        return [f.T.reshape(1, -1, h, w) for f, (h, w) in zip(packing.split(x), packing.grids)]

    def trunk(self, x: torch.Tensor, sample: bool):
        """(1, D, h, w) -> hidden (1, C0, h, w), mean, logvar (None without a bottleneck)."""
        x = self.stem_block(self.stem(x))
        mean = logvar = None
        if self.cfg.latent_channels:
            mean, logvar = self.to_moments(x).chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)  # the LDM posterior's bounds
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
            x = self.from_latent(z)
        for blk in self.mid:
            x = blk(x)
        return x, mean, logvar

    def upsample(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (1, C0, h, w) -> RGB (1, 3, 16h, 16w)."""
        x = hidden
        for stage in self.up:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    # ---- whole images -----------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, packing: Packing, sample: Optional[bool] = None) -> DecoderOutput:
        """Packed features (T, C) -> per image RGB and the intermediates the losses need.

        ``sample``: draw from the latent posterior (default: in training mode) or use its mean.
        """
        sample = self.training if sample is None else sample
        images, hidden, repa, means, logvars = [], [], [], [], []
        for x in self.adapt(features, packing):
            hid, mean, logvar = self.trunk(x, sample)
            images.append(self.upsample(hid)[0])
            hidden.append(hid[0])
            if self.cfg.repa_dim:
                repa.append(self.repa_proj(hid)[0])
            if mean is not None:
                means.append(mean[0])
                logvars.append(logvar[0])
        bottleneck = bool(self.cfg.latent_channels)
        return DecoderOutput(images, hidden, repa if self.cfg.repa_dim else None,
                             means if bottleneck else None, logvars if bottleneck else None)

    @torch.no_grad()
    def decode(self, features: torch.Tensor, packing: Packing) -> list[torch.Tensor]:
        """Packed features -> per image RGB (3, 16h, 16w) in [-1, 1] (posterior mean, clamped)."""
        return [img.clamp(-1, 1) for img in self.forward(features, packing, sample=False).images]

    @torch.no_grad()
    def decode_tiled(self, features: torch.Tensor, grid: tuple[int, int], tile: int = 32, overlap: int = 4,
                     context: Optional[int] = None) -> torch.Tensor:
        """One image's features (h*w, C) -> RGB (3, 16h, 16w) in [-1, 1], decoded tile by tile.

        The grid is cut into tiles of ``tile`` x ``tile`` patches that overlap by ``overlap`` patches;
        each tile is decoded with ``context`` extra patches on every side (thrown away afterwards;
        default: the conv stack's receptive radius, which makes ``norm: channel`` exact), and the
        overlaps are blended with linear ramps so seams do not show.
        """
        h, w = (int(v) for v in grid)
        if tile < 1 or not 0 <= overlap < tile:
            raise ConfigError(f"decode_tiled needs tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
                              f"overlap={overlap}")
        ctx = self.default_context() if context is None else int(context)
        p = self.cfg.patch
        x = self.adapt(features, Packing(((h, w),)))[0]
        out = x.new_zeros(1, 3, h * p, w * p)
        weight = x.new_zeros(1, 1, h * p, w * p)
        for r0, r1 in _spans(h, tile, overlap):
            for c0, c1 in _spans(w, tile, overlap):
                a0, a1, b0, b1 = max(0, r0 - ctx), min(h, r1 + ctx), max(0, c0 - ctx), min(w, c1 + ctx)
                hid, _, _ = self.trunk(x[:, :, a0:a1, b0:b1], sample=False)
                y = self.upsample(hid)[:, :, (r0 - a0) * p:(r1 - a0) * p, (c0 - b0) * p:(c1 - b0) * p]
                wr = _ramp(r1 - r0, p, overlap * p if r0 > 0 else 0, overlap * p if r1 < h else 0, y)
                wc = _ramp(c1 - c0, p, overlap * p if c0 > 0 else 0, overlap * p if c1 < w else 0, y)
                wt = wr.view(1, 1, -1, 1) * wc.view(1, 1, 1, -1)
                out[:, :, r0 * p:r1 * p, c0 * p:c1 * p] += y * wt
                weight[:, :, r0 * p:r1 * p, c0 * p:c1 * p] += wt
        return (out / weight)[0].clamp(-1, 1)

    @staticmethod
    def to_uint8(image: torch.Tensor) -> torch.Tensor:
        """RGB (3, H, W) in [-1, 1] -> (H, W, 3) uint8, rounded (not truncated: this is not the reference path)."""
        return ((image.float().clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0)


def _spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tile spans [start, end) over n patches; the last tile is moved back to end at n."""
    if n <= tile:
        return [(0, n)]
    starts = list(range(0, n - tile + 1, tile - overlap))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return [(s, s + tile) for s in starts]


def _ramp(n_patches: int, p: int, lead: int, tail: int, like: torch.Tensor) -> torch.Tensor:
    """Blend weights along one axis: rising over ``lead`` pixels, falling over ``tail`` pixels, else 1."""
    n = n_patches * p
    pos = torch.arange(n, dtype=like.dtype, device=like.device) + 0.5
    wt = torch.ones(n, dtype=like.dtype, device=like.device)
    if lead:
        wt = torch.minimum(wt, pos / lead)
    if tail:
        wt = torch.minimum(wt, (n - pos) / tail)
    return wt
