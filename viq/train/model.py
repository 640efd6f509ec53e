"""What trains, as one module, and which of its tensors a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from viq.mllm.collate import Batch
from viq.mllm.model import MLLM
from viq.model.student import Student
from viq.train.losses import distill_loss, latent_mse, weighted_total
from viq.train.stage import check_exact


@dataclass
class LossPlan:
    weights: dict[str, float]
    pool_from: Optional[str]  # None | head | vit
    draw: bool
    feat_rec: bool
    vit_grad: bool
    #: losses.cls_distill.max_res: images above max_res^2 pixels are left out of the distillation
    distill_max_res: Optional[int] = None


class TrainModel(nn.Module):
    """Everything that trains, as one module (what DDP/DeepSpeed wrap)."""

    def __init__(self, student: Optional[Student], mllm: Optional[MLLM], plan: LossPlan):
        super().__init__()
        self.student, self.mllm, self.plan = student, mllm, plan

    def forward(self, batch: Batch, teacher_feats: Optional[torch.Tensor] = None,
                target_latents: Optional[list[torch.Tensor]] = None):
        """(total loss, {term: value}, stats). Stats hold detached counts and the code indices."""
        plan = self.plan
        terms: dict[str, torch.Tensor] = {}
        stats: dict = {"indices": None, "lm_tokens": 0, "supervised": 0, "correct": 0.0}
        if batch.n_samples == 0:  # every sample of this micro-batch was skipped: a zero step
            zero = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
            return zero, {}, stats
        feats, grids = [], []
        if batch.images and self.student is not None:
            out = self.student(batch.images, pool_from=plan.pool_from, draw=plan.draw, feat_rec=plan.feat_rec,
                               vit_grad=plan.vit_grad)
            if plan.pool_from is not None:
                keep = distill_images(batch.images, plan.distill_max_res)
                if keep is None:
                    terms["cls_distill"] = distill_loss(out.pooled, teacher_feats)
                elif bool(keep.any()):
                    terms["cls_distill"] = distill_loss(out.pooled[keep], teacher_feats[keep])
                else:  # every image is too large for this loss: a zero that keeps the graph connected
                    terms["cls_distill"] = out.pooled.sum() * 0.0
            if plan.draw:
                terms["rec_latent_mse"] = latent_mse(out.latents, target_latents)
            if self.student.head is not None and plan.weights.get("commit"):
                terms["commit"] = out.aux_loss
            if plan.feat_rec and out.feat_rec is not None:
                terms["feat_rec"] = out.feat_rec
            feats, grids = out.packing.split(out.features), list(out.packing.grids)
            stats["indices"] = out.indices
        if self.mllm is not None:
            lm = self.mllm(batch.input_ids, batch.labels, batch.image_positions, self.mllm.project(feats, grids))
            terms["lm_ce"] = lm.loss
            stats.update(lm_tokens=lm.n_tokens, supervised=lm.n_supervised, correct=float(lm.n_correct))
        total = weighted_total(terms, plan.weights) if any(plan.weights.get(k) for k in terms) else None
        if total is None:
            total = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return total, terms, stats


def distill_images(images, max_res: Optional[int]) -> Optional[torch.Tensor]:
    """Which images the distillation sees: those of at most ``max_res``^2 pixels (None: all)."""
    if max_res is None:
        return None
    return torch.tensor([int(im.shape[-2]) * int(im.shape[-1]) <= max_res * max_res for im in images],
                        device=images[0].device)


def trained_state(model: TrainModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: everything of the model except what is frozen and rebuilt
    identically from its source (the drawer's VAE, the frozen base LLM under LoRA), and the head's
    FSQ projections a training-only bottleneck stands in for (``Student.idle_keys``). Tensors shared
    under two names (tied embeddings) are stored once."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    student = getattr(model, "student", None)
    idle = {f"student.{k}" for k in student.idle_keys} if student is not None else set()
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith("student.drawer.vae.") or name in idle:
            continue
        if name.startswith("mllm.llm.") and name not in trainable:
            continue
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t.detach()
    return out


def load_exact(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Resume: every checkpointed tensor must exist with its shape, and every trained one be present."""
    expected = trained_state(model)
    check_exact(expected, tensors, where)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k].to(t.dtype))
