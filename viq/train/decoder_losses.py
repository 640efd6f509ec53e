"""The decoder stage's losses: MSE, LPIPS, KL, GAN (patch discriminator) and REPA.

generator total = mse * MSE + lpips * LPIPS + kl * KL + g_w * GAN_g + repa * (1 - cos)
  * MSE, LPIPS: per image (at its own size, pixels in [-1, 1]), averaged over images.
  * KL of the latent bottleneck against N(0, I): summed over the latent's elements of an image, averaged
    over images (the LDM convention the 1e-6 default weight comes from). Skipped (absent from the
    dict) when the decoder has no bottleneck.
  * GAN_g: hinge -mean(D(fake)) or non-saturating softplus(-D(fake)), averaged over images.
    g_w = gan.weight * adaptive * [step >= gan.start_step], adaptive = ||grad rec|| / (||grad GAN_g|| + 1e-4)
    at the decoder's last layer, clamped to [0, 1e4] and detached (VQGAN; rec = the weighted MSE + LPIPS).
  * REPA: 1 - cos(projected decoder hidden, DINOv2 patch features on the same grid), averaged over
    positions and images.
discriminator total = gan.weight>0 and step >= start: 0.5 * (hinge: relu(1 - D(real)) + relu(1 + D(fake));
  non-saturating: softplus(-D(real)) + softplus(D(fake))), averaged over images.

A weight of 0 switches a term off: it is not computed and does not appear in the returned dict.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt

from viq.errors import ConfigError


class GanWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: NonNegativeFloat = 0.1
    #: the discriminator and the generator's GAN term join at this optimizer step.
    start_step: NonNegativeInt = 0
    loss: Literal["hinge", "non_saturating"] = "hinge"
    #: scale by ||grad rec|| / ||grad gan|| at the last decoder layer (VQGAN).
    adaptive: bool = True
    adaptive_max: NonNegativeFloat = 1e4


class DecoderLossWeights(BaseModel):
    """Weights of the decoder stage's losses; 0 switches a term off."""

    model_config = ConfigDict(extra="forbid")

    mse: NonNegativeFloat = 1.0
    lpips: NonNegativeFloat = 1.0
    kl: NonNegativeFloat = 1e-6
    gan: GanWeights = Field(default_factory=GanWeights)
    repa: NonNegativeFloat = 0.5

    @classmethod
    def from_section(cls, section) -> "DecoderLossWeights":
        """From a recipe's decoder section whose terms carry ``enabled`` and ``weight`` (duck-typed)."""

        def w(term) -> float:
            return float(term.weight) if getattr(term, "enabled", True) else 0.0

        gan = section.gan
        return cls(mse=w(section.mse), lpips=w(section.lpips), kl=w(section.kl), repa=w(section.repa),
                   gan=GanWeights(weight=w(gan), start_step=gan.start_step, loss=gan.loss, adaptive=gan.adaptive))


# ---- the terms, one function each ----------------------------------------------------------------------
def _mean_over_images(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(values)).mean()


def mse_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    return _mean_over_images(F.mse_loss(p.float(), t.detach().float()) for p, t in zip(preds, targets))


def lpips_loss(net: nn.Module, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    return _mean_over_images(net(p[None].float(), t[None].detach().float())[0] for p, t in zip(preds, targets))


def kl_loss(means: Sequence[torch.Tensor], logvars: Sequence[torch.Tensor]) -> torch.Tensor:
    """KL(N(mean, exp logvar) || N(0, I)), summed over an image's latent, averaged over images."""
    return _mean_over_images(0.5 * (m.float() ** 2 + lv.float().exp() - 1 - lv.float()).sum()
                             for m, lv in zip(means, logvars))


def generator_gan_loss(fake_logits: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":
        return _mean_over_images(-f.float().mean() for f in fake_logits)
    return _mean_over_images(F.softplus(-f.float()).mean() for f in fake_logits)


def discriminator_gan_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor],
                           kind: str) -> torch.Tensor:
    if kind == "hinge":
        terms = (F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real_logits, fake_logits))
    else:
        terms = (F.softplus(-r.float()).mean() + F.softplus(f.float()).mean() for r, f in zip(real_logits, fake_logits))
    return 0.5 * _mean_over_images(terms)


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d last|| / (||d gan / d last|| + 1e-4), clamped to [0, max] and detached (VQGAN)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if g_rec is None or g_gan is None:
        return torch.ones((), device=last_layer.device)
    w = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def repa_loss(projected: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over positions and images of 1 - cos(projected (D, h, w), target (D, h, w))."""
    terms = []
    for p, t in zip(projected, targets):
        if p.shape != t.shape:
            raise ConfigError(f"REPA: projected decoder features {tuple(p.shape)} do not match the target "
                              f"features {tuple(t.shape)}; set the decoder's repa_dim to the encoder's width")
        terms.append((1 - F.cosine_similarity(p.float(), t.detach().float(), dim=0)).mean())
    return _mean_over_images(terms)


# ---- the whole objective ---------------------------------------------------------------------------------
class DecoderLoss(nn.Module):
    """All terms of the decoder stage. The nets a term needs must be given when its weight is > 0.

    ``perceptual``: an LPIPS (``viq.eval.perceptual.load_lpips``); ``dino``: a ``DinoFeatures``;
    ``discriminator``: a ``PatchDiscriminator`` (trained by the caller with ``discriminator_loss``).
    The frozen nets are held here but are not trained (their parameters do not require grad).
    """

    def __init__(self, weights: DecoderLossWeights, perceptual: Optional[nn.Module] = None,
                 dino: Optional[nn.Module] = None, discriminator: Optional[nn.Module] = None):
        super().__init__()
        self.weights = weights
        needs = {"lpips": (weights.lpips, perceptual), "repa": (weights.repa, dino),
                 "gan": (weights.gan.weight, discriminator)}
        missing = [name for name, (w, net) in needs.items() if w > 0 and net is None]
        if missing:
            raise ConfigError(f"decoder losses {missing} have a weight > 0 but no network was given "
                              "(perceptual=LPIPS, dino=DINOv2, discriminator=PatchDiscriminator); "
                              "set their weight to 0 to switch them off")
        if not any([weights.mse, weights.lpips, weights.gan.weight]):
            raise ConfigError("the decoder stage needs at least one of mse, lpips or gan with a weight > 0")
        self.perceptual = perceptual
        self.dino = dino
        self.discriminator = discriminator

    def gan_active(self, step: int) -> bool:
        return self.weights.gan.weight > 0 and step >= self.weights.gan.start_step

    def generator_loss(self, out, targets: Sequence[torch.Tensor], step: int,
                       last_layer: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``out``: the pixel decoder's ``DecoderOutput``; ``targets``: per image (3, 16h, 16w) in [-1, 1].

        Returns the unweighted enabled terms, ``gan_weight`` (when the GAN is on) and ``total``.
        """
        wts = self.weights
        preds = out.images
        if len(preds) != len(targets):
            raise ConfigError(f"{len(preds)} decoded images for {len(targets)} targets")
        for p, t in zip(preds, targets):
            if p.shape != t.shape:
                raise ConfigError(f"decoded image {tuple(p.shape)} and target {tuple(t.shape)} differ in size")
        terms: dict[str, torch.Tensor] = {}
        rec = None
        if wts.mse:
            terms["mse"] = mse_loss(preds, targets)
            rec = wts.mse * terms["mse"]
        if wts.lpips:
            terms["lpips"] = lpips_loss(self.perceptual, preds, targets)
            rec = wts.lpips * terms["lpips"] if rec is None else rec + wts.lpips * terms["lpips"]
        total = rec
        if wts.kl and out.mean is not None:
            terms["kl"] = kl_loss(out.mean, out.logvar)
            total = _add(total, wts.kl * terms["kl"])
        if wts.repa:
            if out.repa is None:
                raise ConfigError("the REPA weight is > 0 but the pixel decoder has no projector (set repa_dim)")
            feats = [self.dino(t[None].float(), tuple(p.shape[-2:]))[0] for t, p in zip(targets, out.repa)]
            terms["repa"] = repa_loss(out.repa, feats)
            total = _add(total, wts.repa * terms["repa"])
        if self.gan_active(step):
            with _frozen(self.discriminator):  # gradients reach the decoder, not the discriminator
                fake = [self.discriminator(p[None]) for p in preds]
            terms["gan"] = generator_gan_loss(fake, wts.gan.loss)
            weight = torch.ones((), device=terms["gan"].device)
            if wts.gan.adaptive and rec is not None and last_layer is not None and torch.is_grad_enabled() \
                    and terms["gan"].requires_grad:
                weight = adaptive_gan_weight(rec, terms["gan"], last_layer, wts.gan.adaptive_max)
            terms["gan_weight"] = weight * wts.gan.weight
            total = _add(total, terms["gan_weight"] * terms["gan"])
        if total is None:  # only a GAN that has not started yet: a zero that keeps the graph connected
            total = sum(p.sum() for p in preds) * 0.0
        terms["total"] = total
        return terms

    def discriminator_loss(self, reals: Sequence[torch.Tensor], fakes: Sequence[torch.Tensor],
                           step: int) -> dict[str, torch.Tensor]:
        """Discriminator terms on real targets and detached decoded images; empty before ``start_step``."""
        if not self.gan_active(step):
            return {}
        real = [self.discriminator(r[None].detach()) for r in reals]
        fake = [self.discriminator(f[None].detach()) for f in fakes]
        loss = discriminator_gan_loss(real, fake, self.weights.gan.loss)
        return {"disc": loss, "logits_real": torch.stack([r.mean() for r in real]).mean().detach(),
                "logits_fake": torch.stack([f.mean() for f in fake]).mean().detach(), "total": loss}


class _frozen:
    """Within the block, the module's parameters do not require grad (restored afterwards)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


def _add(total: Optional[torch.Tensor], term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term
