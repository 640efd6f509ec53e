"""The drawer: LLM features -> adapter -> Qwen-Image latent -> diffusers' VAE decoder -> uint8 image.

The latent is the RAW Qwen-Image latent (training regressed the VAE encoder's posterior mean), so the
VAE's latents_mean/std are never applied. Only the VAE's decoder half is held here.

Large latents decode in overlapping tiles (diffusers' tiled decoding, 512 px tiles blended over
64 px): the VAE's middle block attends over every latent position, so untiled decoding costs
grow with the square of the pixels (a 100000 x 1 image took 95 s); tiled, they grow linearly.
Up to ``TILE_ABOVE`` latent positions (a 1024 x 1024 image) decoding stays untiled and exact, as
the reference decodes.
"""

from __future__ import annotations

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
TILE_PX, TILE_STRIDE_PX = 512, 448


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
            self.vae.enable_tiling(tile_sample_min_height=TILE_PX, tile_sample_min_width=TILE_PX,
                                   tile_sample_stride_height=TILE_STRIDE_PX, tile_sample_stride_width=TILE_STRIDE_PX)
        else:
            self.vae.disable_tiling()
        vae_dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(latent.unsqueeze(2).to(vae_dtype), return_dict=False)[0][:, :, 0]
        img = img[0].permute(1, 2, 0).float()
        return ((img * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
