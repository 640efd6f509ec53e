"""The pass-through quantizer: a bottleneck with a limit and no codes (stage 2-1's "proximal" step).

The head projects each slot D -> d, this module constrains the d-vector, and the head projects it
back d -> D. With ``l_infinite`` every vector lands on the surface of the unit hypercube, where the
FSQ of the next stage will put its codes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.quant import QuantOutput


def apply_limit(x: torch.Tensor, limit: str) -> torch.Tensor:
    """none: x; l2: unit sphere; l_infinite: x / max|x_i| (||x||_inf = 1); tanh: elementwise."""
    if limit == "none":
        return x
    if limit == "l2":
        return F.normalize(x, dim=-1)
    if limit == "l_infinite":
        return x / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)  # clamp as the reference
    if limit == "tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown limit {limit!r}")


class Passthrough(nn.Module):
    kind = "passthrough"
    codebook_size = None

    def __init__(self, dim: int, limit: str = "none"):
        super().__init__()
        self.dim = dim
        self.limit = limit

    def forward(self, z: torch.Tensor) -> QuantOutput:
        codes = apply_limit(z.float(), self.limit)
        return QuantOutput(codes, None, codes.new_zeros(()))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, limit={self.limit}"
