"""Packed (variable-length) attention: several images in one sequence, each attending only to itself.

flash-attn's varlen kernel is used on CUDA when it is installed and the dtype is half/bf16;
otherwise an exact PyTorch path runs scaled-dot-product attention segment by segment.
Both compute the same function (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional extra: pip install viq[flash]
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # pragma: no cover - not installable without CUDA
    _flash_varlen = None


@dataclass(frozen=True)
class Segments:
    """Lengths of the images packed into one sequence (in tokens)."""

    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def cu_seqlens(self, device) -> torch.Tensor:
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int32, device=device)

    def scaled(self, factor: int) -> "Segments":
        return Segments(tuple(n * factor for n in self.lengths))


def flash_available(t: torch.Tensor) -> bool:
    return _flash_varlen is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     scale: float, use_flash: bool | None = None) -> torch.Tensor:
    """Non-causal attention per segment. q, k, v: (T, heads, head_dim) -> (T, heads, head_dim)."""
    if use_flash is None:
        use_flash = flash_available(q)
    if use_flash:
        cu = segments.cu_seqlens(q.device)
        return _flash_varlen(q, k, v, cu, cu, segments.max_len, segments.max_len,
                             softmax_scale=scale, causal=False)
    if len(segments.lengths) == 1:
        return _sdpa(q, k, v, scale)
    outs = []
    start = 0
    for n in segments.lengths:
        sl = slice(start, start + n)
        outs.append(_sdpa(q[sl], k[sl], v[sl], scale))
        start += n
    return torch.cat(outs, dim=0)


def _sdpa(q, k, v, scale):
    # (L, H, D) -> (1, H, L, D) for SDPA and back.
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], scale=scale)
    return o[0].transpose(0, 1)
