"""Held-out evaluation during training: losses, caption accuracy, attribute scores, code usage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from viq.mllm.caption import decode_text
from viq.mllm.collate import Batch, ConversationDataset, collate
from viq.mllm.model import MLLM
from viq.train.losses import CodebookUsage
from viq.train.model import TrainModel
from viq.train.targets import FrozenTargets


@dataclass
class EvalSpec:
    dataset: ConversationDataset
    micro_batch: int
    tokenizer: object
    eos_id: Optional[int]
    limit: Optional[int] = None
    generate: bool = True  # greedy captions scored by attribute (synthetic data with meta)
    max_new_tokens: int = 24


ATTRIBUTES = ("shape", "colour", "size", "position")


@torch.no_grad()
def evaluate(model: TrainModel, targets: FrozenTargets, spec: EvalSpec, accelerator, tick=None) -> dict:
    """Held-out metrics, each process on its share of the samples, summed across processes.

    caption_token_accuracy: teacher-forced argmax accuracy on answer tokens, the image entering as
    its (quantized) codes; ``_image_blind``: the same with the image tokens zeroed (the bar the
    image must lift the accuracy above). attribute_accuracy: greedy captions parsed back into the synthetic
    attributes (only for samples that carry them). latent_mse: drawer latent vs VAE posterior mean.
    """
    from viq.data.synthetic import parse_caption

    was_training = model.training
    model.eval()
    n = len(spec.dataset) if spec.limit is None else min(spec.limit, len(spec.dataset))
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    device = accelerator.device
    sums = {k: 0.0 for k in ("lm_ce_sum", "supervised", "correct", "correct_blind", "rec_sum", "rec_images", "cos_sum", "cos_images",
                             "skipped", *(f"attr_{a}" for a in ATTRIBUTES), "attr_samples")}
    student, mllm = model.student, model.mllm
    plan = model.plan
    usage = CodebookUsage(student.codebook_size, device) if student is not None and student.codebook_size else None
    lat_stats = None  # per latent channel: count, sum, sum of squares of the targets
    for start in range(0, len(mine), spec.micro_batch):
        batch = collate([spec.dataset[i] for i in mine[start:start + spec.micro_batch]]).to(device)
        sums["skipped"] += len(batch.skipped)
        if tick is not None:
            tick(min(n, (start + spec.micro_batch) * accelerator.num_processes), n)
        if batch.n_samples == 0:
            continue
        with accelerator.autocast():
            feats, grids = [], []
            if batch.images and student is not None:
                out = student(batch.images, pool_from=plan.pool_from, draw=plan.draw)
                if plan.draw:
                    tl = targets.latents(batch.images, batch.image_keys)
                    for p, t in zip(out.latents, tl):
                        t = t.to(p.device).reshape(p.shape).float()
                        sums["rec_sum"] += float(F.mse_loss(p.float(), t))
                        sums["rec_images"] += 1
                        flat = t.transpose(0, 1).reshape(t.shape[1], -1).double()
                        part = torch.stack((torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1),
                                            flat.square().sum(1)))
                        lat_stats = part if lat_stats is None else lat_stats + part
                if plan.pool_from is not None:
                    tf = targets.teacher_features(batch.images, batch.image_keys).to(device)
                    sums["cos_sum"] += float(F.cosine_similarity(out.pooled.float(), tf, dim=-1).sum())
                    sums["cos_images"] += len(batch.images)
                if usage is not None:
                    usage.update(out.indices)
                feats, grids = out.packing.split(out.features), list(out.packing.grids)
            if mllm is not None:
                embeds = mllm.project(feats, grids)
                lm = mllm(batch.input_ids, batch.labels, batch.image_positions, embeds)
                sums["lm_ce_sum"] += float(lm.loss) * lm.n_supervised
                sums["supervised"] += lm.n_supervised
                sums["correct"] += float(lm.n_correct)
                if feats:  # the same answers with the image tokens zeroed: what the text alone predicts
                    blind = mllm(batch.input_ids, batch.labels, batch.image_positions,
                                 [torch.zeros_like(e) for e in embeds])
                    sums["correct_blind"] += float(blind.n_correct)
                if spec.generate:
                    _generate_and_score(mllm, batch, embeds, spec, sums, parse_caption)
    totals = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    s = dict(zip(sums, totals.tolist()))
    metrics: dict = {"samples": n, "skipped": int(s["skipped"])}
    if s["supervised"]:
        metrics["caption_token_accuracy"] = s["correct"] / s["supervised"]
        metrics["caption_token_accuracy_image_blind"] = s["correct_blind"] / s["supervised"]
        metrics["lm_ce"] = s["lm_ce_sum"] / s["supervised"]
    if s["rec_images"]:
        metrics["latent_mse"] = s["rec_sum"] / s["rec_images"]
    if lat_stats is not None or (accelerator.num_processes > 1 and s["rec_images"]):
        # What predicting one constant per latent channel would score: the bar a drawer must beat to
        # show it reconstructs the image rather than the data set's average.
        if lat_stats is None:
            lat_stats = torch.zeros(3, model.student.cfg.drawer.vae.z_dim, dtype=torch.float64, device=device)
        if accelerator.num_processes > 1:
            lat_stats = accelerator.reduce(lat_stats, "sum")
        n, sm, sq = lat_stats
        metrics["latent_mse_constant_baseline"] = float((sq / n - (sm / n) ** 2).mean())
    if s["cos_images"]:
        metrics["distill_cosine"] = s["cos_sum"] / s["cos_images"]
    if s["attr_samples"]:
        acc = {a: s[f"attr_{a}"] / s["attr_samples"] for a in ATTRIBUTES}
        acc["mean"] = sum(acc.values()) / len(ATTRIBUTES)
        metrics["attribute_accuracy"] = acc
        metrics["attribute_samples"] = int(s["attr_samples"])
    if usage is not None:
        counts = usage.counts
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, "sum")
        metrics.update(CodebookUsage.stats(counts))
    model.train(was_training)
    return metrics


def _generate_and_score(mllm: MLLM, batch: Batch, embeds, spec: EvalSpec, sums: dict, parse_caption) -> None:
    k = 0
    for ids, labels, pos, meta in zip(batch.input_ids, batch.labels, batch.image_positions, batch.meta):
        imgs = embeds[k:k + len(pos)]
        k += len(pos)
        if not all(a in meta for a in ATTRIBUTES):
            continue
        first = next((i for i, lab in enumerate(labels) if lab != -100), None)
        if first is None:
            continue
        prompt_pos = [p for p in pos if p < first]
        out = mllm.generate(ids[:first], prompt_pos, imgs[:len(prompt_pos)], spec.max_new_tokens, spec.eos_id)
        got = parse_caption(decode_text(spec.tokenizer, out))
        sums["attr_samples"] += 1
        for a in ATTRIBUTES:
            sums[f"attr_{a}"] += float(got is not None and getattr(got, a) == meta[a])
