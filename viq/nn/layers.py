"""The building blocks shared by the ViT, the head and the drawer's adapter.

Parameter names follow timm's (``fc1``/``fc2``, ``qkv``/``proj``, ``norm1``/``norm2``) because the
published ViQ weights use them. GELU is the exact (erf) form everywhere, as in ViQ.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.nn.attention import Segments, packed_attention


class Mlp(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out or dim_in)

    def forward(self, x):
        h = self.fc1(x)
        if h.requires_grad:  # training: autograd needs GELU's input
            return self.fc2(self.act(h))
        # inference: GELU in place (the same kernel, same values) keeps one hidden-size buffer, not two
        return self.fc2(torch.ops.aten.gelu_(h))


class Attention(nn.Module):
    """Multi-head self-attention over a packed sequence (T, C)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.heads, self.head_dim).unbind(1)
        o = packed_attention(q, k, v, segments, self.scale)
        return self.proj(o.reshape(t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x, segments: Segments):
        x = x + self.attn(self.norm1(x), segments)
        return x + self.mlp(self.norm2(x))


class ResidualMlp(nn.Module):
    """x += mlp(LN(x)); the head's post-quantisation MLPs (LayerNorm eps 1e-5 as in ViQ)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class AttentionPool(nn.Module):
    """MAP head: one learned latent query attends over an image's tokens (SigLIP's pooled feature)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) tokens of one image -> (C,) pooled feature."""
        n, c = x.shape
        hd = c // self.heads
        q = self.q(self.latent[0]).view(1, self.heads, hd).transpose(0, 1)  # (H, 1, hd)
        k, v = self.kv(x).view(n, 2, self.heads, hd).permute(1, 2, 0, 3).unbind(0)  # (H, N, hd)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # (H, 1, hd)
        o = self.proj(o.transpose(0, 1).reshape(1, c))
        o = o + self.mlp(self.norm(o))
        return o[0]
