"""The tokenizer-training losses and the codebook statistics (reference-training.md §2.10).

total = lm_ce * CE(answers) + cls_distill * mean(1 - cos(student MAP, teacher MAP))
      + rec_latent_mse * mean_images MSE(predicted latent, sg VAE posterior mean)
      + commit * quantizer aux + feat_rec * MSE(sg LN(ViT), head output before its affine)

The reference's 1e-13 NLL term on the latent is left out (it is numerically nothing).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over images of 1 - cos(student, teacher); (B, C) each, the teacher is a constant."""
    return (1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()


def latent_mse(predicted: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over images of the per-image mean squared error; shapes must agree image by image."""
    if len(predicted) != len(targets) or not predicted:
        raise ValueError(f"{len(predicted)} predicted latents for {len(targets)} targets")
    terms = []
    for p, t in zip(predicted, targets):
        t = t.to(p.device).reshape(p.shape)
        terms.append(F.mse_loss(p.float(), t.detach().float()))
    return torch.stack(terms).mean()


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of weight * term over the terms present (a weight of 0 drops the term)."""
    total = None
    for name, value in terms.items():
        w = weights.get(name, 0.0)
        if w:
            total = value * w if total is None else total + value * w
    if total is None:
        raise ValueError("no loss term with a non-zero weight")
    return total


class CodebookUsage:
    """Counts of code indices over a window: share of the codebook used and perplexity.

    Perplexity = exp(entropy of the empirical code distribution), between 1 (one code) and the
    codebook size (all codes equally often).
    """

    def __init__(self, size: int, device="cpu"):
        self.size = size
        self.counts = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, indices: Optional[torch.Tensor]) -> None:
        if indices is not None and indices.numel():
            self.counts += torch.bincount(indices.detach().reshape(-1).to(torch.int64),
                                          minlength=self.size).to(self.counts)

    def reset(self) -> None:
        self.counts.zero_()

    @staticmethod
    def stats(counts: torch.Tensor) -> dict[str, float]:
        total = float(counts.sum())
        if total == 0:
            return {"codebook_used": 0.0, "codebook_perplexity": 0.0}
        p = counts[counts > 0] / total
        entropy = float(-(p * p.log()).sum())
        return {"codebook_used": float((counts > 0).sum()) / counts.numel(), "codebook_perplexity": math.exp(entropy)}
