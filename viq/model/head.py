"""The ViQ head: tokens -> 4 FSQ codes per patch (encode) and codes -> LLM features (decode).

encode: LayerNorm without affine -> pre blocks -> expand each patch into 4 slots (an MLP to 4C,
then a reshape: slot j = channels [jC, (j+1)C)) -> slot MLP -> RoPE-2D FSQ blocks (the 4 slots act
as 4 attention heads over the patches of one image) -> project_in -> FSQ.
decode: codebook -> project_out -> merge the 4 slots (reshape to 4C, MLP) -> post MLPs -> affine.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from viq.config import HeadConfig
from viq.nn.attention import Segments, packed_attention
from viq.nn.layers import Block, Mlp, ResidualMlp
from viq.nn.rope2d import apply_rope, grid_angles, rope_frequencies
from viq.nn.vit import Packing
from viq.quant.fsq import FSQ


def _home() -> torch.device:
    """Where the head's computed tables go: the device of a ``with torch.device(...)`` build, so a model
    built on CUDA is whole there; the CPU under ``torch.device("meta")`` (a load assigns weights only)."""
    dev = torch.get_default_device()
    return torch.device("cpu") if dev.type == "meta" else dev


class SlotAttention(nn.Module):
    """Attention where the 4 slots of each patch are the heads, with 2D RoPE on q and k."""

    def __init__(self, dim: int, attn_dim: int, slots: int):
        super().__init__()
        self.slots = slots
        # The reference narrows wide inputs to at most attn_dim before attending.
        self.attn_dim = min(dim, attn_dim)
        if dim > attn_dim:
            self.decrease_dim = nn.Linear(dim, attn_dim)
            self.increase_dim = nn.Linear(attn_dim, dim)
        else:
            self.decrease_dim = self.increase_dim = nn.Identity()
        self.qkv = nn.Linear(self.attn_dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, self.attn_dim)
        self.scale = self.attn_dim ** -0.5

    def forward(self, x: torch.Tensor, segments: Segments, theta: torch.Tensor) -> torch.Tensor:
        """x: (4N, C) in order 4n + j; segments in patches; theta: (N, slots, attn_dim / 2)."""
        x = self.decrease_dim(x)
        n = x.shape[0] // self.slots
        q, k, v = self.qkv(x).view(n, self.slots, 3, self.attn_dim).unbind(2)  # (N, slots, A)
        q, k = apply_rope(q, theta), apply_rope(k, theta)
        o = packed_attention(q, k, v, segments, self.scale)
        return self.increase_dim(self.proj(o.reshape(n * self.slots, self.attn_dim)))


class FSQBlock(nn.Module):
    def __init__(self, dim: int, attn_dim: int, slots: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SlotAttention(dim, attn_dim, slots)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x, segments, theta):
        x = x + self.attn(self.norm1(x), segments, theta)
        return x + self.mlp(self.norm2(x))


class ViQHead(nn.Module):
    """Holds only the parts asked for: ``encode`` (up to FSQ) and/or ``decode`` (codes -> features)."""

    def __init__(self, width: int, heads: int, cfg: HeadConfig, encode: bool = True, decode: bool = True):
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.slots = cfg.slots
        self.fsq = FSQ(cfg.levels)
        self.has_encode, self.has_decode = encode, decode
        self.grad_checkpointing = False
        d, s = width, cfg.slots
        if encode:
            # ViQ's "LayerNorm trick": normalise without affine before quantising (eps 1e-5).
            self.pre_norm = nn.LayerNorm(d, eps=1e-5, elementwise_affine=False)
            self.pre_blocks = nn.ModuleList(Block(d, heads, 4 * d) for _ in range(cfg.pre_blocks))
            self.expand_slots = Mlp(d, s * d, s * d)
            self.slot_mlp = Mlp(d, d, d)
            attn_dim = min(d, cfg.fsq_attn_dim)
            self.fsq_blocks = nn.ModuleList(FSQBlock(d, cfg.fsq_attn_dim, s, 4 * d) for _ in range(cfg.fsq_blocks))
            with torch.device("cpu"):  # not a weight: computed on the CPU (the same bits wherever it runs)
                freqs = rope_frequencies(attn_dim, s, cfg.rope)
            self.register_buffer("rope_freqs", freqs.to(_home()), persistent=False)
            self.project_in = nn.Linear(d, self.fsq.dim)
        if decode:
            self.project_out = nn.Linear(self.fsq.dim, d)
            self.merge_slots = Mlp(s * d, s * d, d)
            self.post_mlps = nn.ModuleList([Mlp(d, d, d)] + [ResidualMlp(d, 2 * d) for _ in range(cfg.residual_mlps)])
            self.post_scale = nn.Parameter(torch.ones(d))
            self.post_shift = nn.Parameter(torch.zeros(d))
            # The code table used by decode. Normally equal to fsq.codebook(); reference files may hold a
            # bf16-rounded copy, which is kept as published so features match the reference.
            self.register_buffer("codebook", self.fsq.codebook().to(_home()), persistent=True)

    # ---- encode -------------------------------------------------------------------------------
    def angles(self, packing: Packing) -> torch.Tensor:
        freqs = self.rope_freqs.float().cpu()
        theta = torch.cat([grid_angles(freqs, g) for g in packing.grids], dim=0)
        return theta.to(self.rope_freqs.device)

    def _run(self, blk, *args):
        if self.grad_checkpointing and self.training:
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def pre_quant(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Packed ViT tokens (T, C) -> FSQ input z (4T, d), slot order 4n + j."""
        return self.project_in(self.slot_features(tokens, packing))

    def slot_features(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Packed ViT tokens (T, C) -> slot features (4T, C) before project_in (training bottlenecks read them)."""
        segments = packing.segments
        x = self.pre_norm(tokens)
        for blk in self.pre_blocks:
            x = self._run(blk, x, segments)
        x = self.expand_slots(x).reshape(-1, self.width)
        x = self.slot_mlp(x)
        theta = self.angles(packing)
        for blk in self.fsq_blocks:
            x = self._run(blk, x, segments, theta)
        return x

    def encode(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Packed tokens -> int64 indices (4T,) in position 4n + j."""
        return self.fsq.encode(self.pre_quant(tokens, packing))

    # ---- decode -------------------------------------------------------------------------------
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (4T, d) -> features (T, C). Differentiable (used in training)."""
        x = self.project_out(codes.to(self.project_out.weight.dtype))
        x = self.merge_slots(x.reshape(-1, self.slots * self.width))
        for mlp in self.post_mlps:
            x = mlp(x)
        return x * self.post_scale + self.post_shift

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (4T,) -> LLM features (T, C); depends on the image only through the indices."""
        return self.decode_codes(self.codebook[indices.to(torch.int64).reshape(-1)])
