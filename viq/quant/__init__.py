"""Quantizers the ViQ head can use, behind one small interface.

A quantizer maps the head's ``project_in`` output z (N, d) to code vectors of the same width that
``project_out`` reads, plus integer indices (None when there are no codes) and an auxiliary loss:

* ``fsq``: finite scalar quantization (``viq.quant.fsq``), no auxiliary loss;
* ``simvq``: a frozen random codebook seen through a learnable linear map (``viq.quant.simvq``);
* ``passthrough``: no codes, only a limit on the bottleneck (the reference's "fake" quantizer of
  stage 2-1, ``viq.quant.passthrough``).

The projections D <-> d belong to the head, so changing the quantizer between stages changes the
shapes of ``head.project_in`` / ``head.project_out`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from viq.errors import ConfigError

KINDS = ("fsq", "simvq", "passthrough")
LIMITS = ("none", "l2", "l_infinite", "tanh")


@dataclass
class QuantOutput:
    """codes: (N, d) differentiable code vectors; indices: (N,) int64 or None; aux_loss: scalar."""

    codes: torch.Tensor
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor


class FSQQuantizer(nn.Module):
    """The FSQ of ``viq.quant.fsq`` behind the quantizer interface (it has no trainable state)."""

    kind = "fsq"

    def __init__(self, levels: list[int]):
        super().__init__()
        from viq.quant.fsq import FSQ

        self.fsq = FSQ(levels)
        self.dim = self.fsq.dim
        self.codebook_size = self.fsq.codebook_size

    def forward(self, z: torch.Tensor) -> QuantOutput:
        codes = self.fsq.quantize(z)
        indices = self.fsq.codes_to_indices(codes.detach())
        return QuantOutput(codes, indices, codes.new_zeros(()))


def build_quantizer(kind: str, *, levels: Optional[list[int]] = None, dim: Optional[int] = None,
                    codebook_size: Optional[int] = None, limit: Optional[str] = None,
                    seed: int = 0) -> nn.Module:
    """One quantizer. fsq needs ``levels``; simvq ``dim`` and ``codebook_size``; passthrough ``dim``."""
    if kind == "fsq":
        if not levels:
            raise ConfigError("an fsq quantizer needs levels, e.g. [8, 8, 8, 6, 5]")
        return FSQQuantizer(list(levels))
    limit = limit or "none"
    if limit not in LIMITS:
        raise ConfigError(f"unknown quantizer limit {limit!r}; choose one of {', '.join(LIMITS)}")
    if not dim:
        raise ConfigError(f"a {kind} quantizer needs its bottleneck width (dim)")
    if kind == "simvq":
        from viq.quant.simvq import SimVQ

        if not codebook_size:
            raise ConfigError("a simvq quantizer needs codebook_size (the reference used 32768)")
        return SimVQ(dim, codebook_size, limit=limit, seed=seed)
    if kind == "passthrough":
        from viq.quant.passthrough import Passthrough

        return Passthrough(dim, limit)
    raise ConfigError(f"unknown quantizer {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = ["KINDS", "LIMITS", "FSQQuantizer", "QuantOutput", "build_quantizer"]
