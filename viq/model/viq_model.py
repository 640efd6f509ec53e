"""The ViQ model as one nn.Module holding only the parts a task needs.

Parts: ``encoder`` (ViT + head up to FSQ: all that producing codes needs), ``pool`` (the ViT's final
norm + attention pool, for distillation), ``decoder`` (codes -> LLM features), ``drawer``
(features -> Qwen-Image latent -> pixels) and, once trained, ``pixel_decoder`` (features -> pixels). The embedder and the drawer of the reference are views over these.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from viq.config import ViQConfig
from viq.model.drawer import Drawer
from viq.model.head import ViQHead
from viq.nn.vit import AnyResViT, Packing

ALL_PARTS = ("encoder", "pool", "decoder", "drawer", "pixel_decoder")

#: state-dict key prefixes owned by each part (in viq's own names).
PART_PREFIXES = {
    "encoder": ("vit.patch_embed.", "vit.pos_embed", "vit.blocks.", "head.pre_blocks.", "head.expand_slots.",
                "head.slot_mlp.", "head.fsq_blocks.", "head.project_in."),
    "pool": ("vit.norm.", "vit.attn_pool."),
    "decoder": ("head.project_out.", "head.merge_slots.", "head.post_mlps.", "head.post_scale",
                "head.post_shift", "head.codebook"),
    "drawer": ("drawer.",),
    "pixel_decoder": ("pixel_decoder.",),
}


def part_of(key: str) -> str:
    for part, prefixes in PART_PREFIXES.items():
        if key.startswith(prefixes):
            return part
    raise KeyError(key)


class ViQModel(nn.Module):
    def __init__(self, cfg: ViQConfig, parts=ALL_PARTS):
        super().__init__()
        parts = tuple(p for p in ALL_PARTS if p in set(parts))
        if cfg.pixel_decoder is None:  # a model without a trained pixel decoder simply lacks that part
            parts = tuple(p for p in parts if p != "pixel_decoder")
        self.cfg, self.parts = cfg, parts
        if "encoder" in parts or "pool" in parts:
            self.vit = AnyResViT(cfg.vit, with_pool="pool" in parts and cfg.vit.attn_pool)
            if "encoder" not in parts:  # pool alone: keep only norm + attn_pool
                del self.vit.patch_embed, self.vit.pos_embed, self.vit.blocks
        if "encoder" in parts or "decoder" in parts:
            self.head = ViQHead(cfg.vit.width, cfg.vit.heads, cfg.head,
                                encode="encoder" in parts, decode="decoder" in parts)
        if "drawer" in parts:
            self.drawer = Drawer(cfg.vit.width, cfg.vit.heads, cfg.drawer)
        if "pixel_decoder" in parts:
            from viq.model.pixel_decoder import PixelDecoder

            self.pixel_decoder = PixelDecoder(cfg.pixel_decoder)

    def require(self, *parts: str) -> None:
        from viq.errors import ConfigError

        missing = [p for p in parts if p not in self.parts]
        if "pixel_decoder" in missing and self.cfg.pixel_decoder is None:
            raise ConfigError("this model has no pixel decoder; train one with the decoder stage "
                              "(viqctl train --recipe recipes/decoder.yaml) or use --decoder vae")
        if missing:
            raise ConfigError(f"this model was loaded without the part(s) {missing}; load it with parts={list(parts)}")

    def compile_encoder(self, **kwargs) -> None:
        """torch.compile the ViT's MLPs in place (dynamic shapes: packed lengths vary per batch).

        Only the MLPs: attention keeps its per-image segments eager, so no recompiles per packing."""
        self.require("encoder")
        for blk in self.vit.blocks:
            blk.mlp.compile(dynamic=True, **kwargs)

    # ---- the data flow ------------------------------------------------------------------------
    def encode(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, Packing]:
        """Images (3, H, W) in [-1, 1] -> packed indices (4T,) int64 and the packing."""
        self.require("encoder")
        tokens, packing = self.vit(images)
        return self.head.encode(tokens, packing), packing

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Packed indices (4T,) -> features (T, C)."""
        self.require("decoder")
        return self.head.decode(indices)

    def draw_latents(self, features: torch.Tensor, packing: Packing) -> list[torch.Tensor]:
        self.require("drawer")
        return self.drawer.latents(features, packing)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        self.require("drawer")
        return self.drawer.decode_latent(latent)

    def decode_pixels(self, features: torch.Tensor, packing: Packing, tile: int = 64) -> list[torch.Tensor]:
        """Features -> uint8 images (16h, 16w, 3) through the pixel decoder; large grids are tiled."""
        self.require("pixel_decoder")
        dec = self.pixel_decoder
        out = []
        for feat, grid in zip(packing.split(features), packing.grids):
            if max(grid) > tile:
                img = dec.decode_tiled(feat, grid, tile=tile)
            else:
                img = dec.decode(feat, Packing((grid,)))[0]
            out.append(dec.to_uint8(img))
        return out
