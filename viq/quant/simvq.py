"""SimVQ: a frozen random codebook C0 seen through a learnable linear map W, so C = C0 W^T.

Nearest neighbour in the (d-dim) bottleneck; the loss is the reference's
``MSE(q, sg z) + beta * MSE(z, sg q)`` (the first term trains W, the second commits z to its code),
and gradients reach z through the rotation trick (Fifty et al., 2024): q_hat = sg(|q|/|z| R) z,
where R rotates z/|z| onto q/|q|. The limit is applied to q_hat, after the lookup.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.quant import QuantOutput
from viq.quant.passthrough import apply_limit


def rotate_to(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Value q, gradient of the fixed linear map (|q|/|z|) R applied to z. z, q: (N, d)."""
    zn = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    qn = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    e = (z / zn).detach()
    u = (q / qn).detach()
    r = F.normalize(e + u, dim=-1, eps=eps)
    # R z = z - 2 r (r.z) + 2 u (e.z), all of r, u, e constant.
    rz = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * u * (e * z).sum(-1, keepdim=True)
    return (qn / zn).detach() * rz


class SimVQ(nn.Module):
    kind = "simvq"

    def __init__(self, dim: int, codebook_size: int, limit: str = "none", beta: float = 0.25, seed: int = 0):
        super().__init__()
        self.dim, self.codebook_size, self.limit, self.beta = dim, codebook_size, limit, beta
        # Its own generator: the frozen codebook does not depend on what was built before it.
        g = torch.Generator(device="cpu").manual_seed(seed)
        base = torch.randn(codebook_size, dim, generator=g, device="cpu") * dim ** -0.5
        self.register_buffer("codebook_base", base, persistent=True)
        self.code_transform = nn.Linear(dim, dim, bias=False)

    def codebook(self) -> torch.Tensor:
        """The effective codebook C0 W^T: (K, d)."""
        return self.code_transform(self.codebook_base.to(self.code_transform.weight.dtype))

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Index of the nearest code for each row of z (squared L2), in chunks of rows."""
        cb = codebook.float()
        c2 = (cb * cb).sum(-1)
        out = []
        for part in z.float().split(chunk):
            out.append((c2[None] - 2 * part @ cb.T).argmin(dim=-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=z.device)

    def forward(self, z: torch.Tensor) -> QuantOutput:
        z = z.float()
        codebook = self.codebook().float()
        indices = self.nearest(z, codebook)
        q = codebook[indices]
        aux = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        codes = apply_limit(rotate_to(z, q), self.limit)
        return QuantOutput(codes, indices, aux)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> limited code vectors (what project_out reads)."""
        return apply_limit(self.codebook().float()[indices.to(torch.int64)], self.limit)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, limit={self.limit}"
