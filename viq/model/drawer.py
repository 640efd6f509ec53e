"""The drawer: LLM features -> adapter -> Qwen-Image latent -> diffusers' VAE decoder -> uint8 image.

The latent is the RAW Qwen-Image latent (training regressed the VAE encoder's posterior mean), so the
VAE's latents_mean/std are never applied. Only the VAE's decoder half is held here.

Large latents decode in overlapping tiles (diffusers' tiled decoding, blended over 64 px): the
VAE's middle block attends over every latent position and its activations grow with the image, so
untiled decoding's memory (and, far above 10 MP, its time) grows with the square of the pixels;
tiled, both grow linearly. Up to ``TILE_ABOVE`` latent positions (a 1024 x 1024 image) decoding
stays untiled and exact, as the reference decodes. Tiles hold up to ``TILE_ABOVE`` positions each,
shaped like the image (a 16 px high strip is cut into 16 x 65536 px pieces, not 512 px squares):
every tile then costs what an untiled decode of its size costs, and the overlap stays small
(``benchmarks/reconstruct.py``: 512 px square tiles made a strip 1.6-2x slower than untiled).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from viq.config import DrawerConfig
from viq.nn.layers import Block, Mlp
from viq.nn.vit import Packing


def build_vae_decoder(cfg: DrawerConfig) -> nn.Module:
    """diffusers' AutoencoderKLQwenImage without its encoder half (unused for drawing)."""
    from diffusers import AutoencoderKLQwenImage

    kwargs = cfg.vae.model_dump(exclude_none=True)
    vae = AutoencoderKLQwenImage(**kwargs)
    # An empty module keeps diffusers' cache bookkeeping (it counts the encoder's convs) working.
    vae.encoder = nn.Module()
    vae.quant_conv = nn.Identity()
    return vae


#: latent positions above which the VAE decodes in tiles (128 x 128 latents = 1024 x 1024 pixels)
TILE_ABOVE = 128 * 128
#: latent positions two neighbouring tiles share (8 = 64 px, blended linearly)
TILE_OVERLAP = 8


def tile_shape(height: int, width: int, max_positions: int, overlap: int = TILE_OVERLAP) -> tuple[int, int, int, int]:
    """Latent tile (height, width, stride_h, stride_w) of at most ``max_positions`` positions.

    Square (side isqrt(max_positions)) when both sides are longer; a side shorter than that is kept
    whole (stride = the side: one row or column of tiles) and the other grows to fill the area."""
    side = max(2 * overlap + 1, math.isqrt(max_positions))
    if height <= side and width > side:
        tw = max(side, max_positions // height)
        return height, tw, height, tw - overlap
    if width <= side and height > side:
        th = max(side, max_positions // width)
        return th, width, th - overlap, width
    return side, side, side - overlap, side - overlap


class Drawer(nn.Module):
    def __init__(self, width: int, heads: int, cfg: DrawerConfig):
        super().__init__()
        self.cfg = cfg
        # adapter: Mlp, LayerNorm, then transformer blocks (indices as in the published files).
        self.adapter = nn.ModuleList([Mlp(width, width, width), nn.LayerNorm(width, eps=1e-6)]
                                     + [Block(width, heads, 4 * width) for _ in range(cfg.adapter_blocks)])
        up = cfg.latent_upsample
        self.latent_norm = nn.GroupNorm(cfg.group_norm_groups, width, eps=1e-6)
        self.latent_act = nn.SiLU()
        self.latent_conv = nn.Conv2d(width, cfg.vae.z_dim * up * up, 3, padding=1)
        self.vae = build_vae_decoder(cfg)

    def latents(self, features: torch.Tensor, packing: Packing) -> list[torch.Tensor]:
        """Packed features (T, C) -> per image raw latent (1, z, up*h, up*w)."""
        x = features
        segments = packing.segments
        for layer in self.adapter:
            x = layer(x, segments) if isinstance(layer, Block) else layer(x)
        out = []
        up = self.cfg.latent_upsample
        for feat, (h, w) in zip(packing.split(x), packing.grids):
            y = feat.T.reshape(1, -1, h, w)
            y = self.latent_conv(self.latent_act(self.latent_norm(y)))
            b, c, _, _ = y.shape
            # pixel shuffle: channel (c * up + i) * up + j -> latent[c, up*y + i, up*x + j]
            y = y.reshape(b, c // (up * up), up, up, h, w).permute(0, 1, 4, 2, 5, 3)
            out.append(y.reshape(b, c // (up * up), h * up, w * up))
        return out

    def decode_latent(self, latent: torch.Tensor, tile_above: int | None = TILE_ABOVE) -> torch.Tensor:
        """Raw latent (1, z, H/8, W/8) -> image (H, W, 3) uint8.

        Conversion as the reference: x * 0.5 + 0.5, clamp [0, 1], * 255, then TRUNCATE to uint8.
        ``tile_above``: latents with more positions decode in tiles (None: never tile).
        """
        h, w = latent.shape[-2:]
        if tile_above is not None and h * w > tile_above:
            px = self.vae.spatial_compression_ratio
            th, tw, sh, sw = tile_shape(h, w, tile_above)
            self.vae.enable_tiling(tile_sample_min_height=th * px, tile_sample_min_width=tw * px,
                                   tile_sample_stride_height=sh * px, tile_sample_stride_width=sw * px)
        else:
            self.vae.disable_tiling()
        vae_dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(latent.unsqueeze(2).to(vae_dtype), return_dict=False)[0][:, :, 0]
        img = img[0].permute(1, 2, 0).float()
        return ((img * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
