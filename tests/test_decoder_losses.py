import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from viq.errors import ConfigError
from viq.eval.perceptual import load_dinov2, load_lpips
from viq.model.discriminator import PatchDiscriminator
from viq.model.pixel_decoder import PixelDecoder, tiny_pixel_decoder_config
from viq.nn.vit import Packing
from viq.train.decoder_losses import (DecoderLoss, DecoderLossWeights, GanWeights, adaptive_gan_weight,
                                      discriminator_gan_loss, generator_gan_loss, kl_loss, repa_loss)

GRIDS = ((1, 3), (2, 1))
TERMS = ("mse", "lpips", "kl", "gan", "repa")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    dino = load_dinov2(tiny=True)
    dec = PixelDecoder(tiny_pixel_decoder_config(repa_dim=dino.dim)).train()
    disc = PatchDiscriminator(channels=8, layers=2, groups=4)
    return SimpleNamespace(dec=dec, dino=dino, lpips=load_lpips(tiny=True), disc=disc)


def _batch(dec, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(sum(h * w for h, w in GRIDS), 64, generator=g)
    targets = [torch.rand(3, 16 * h, 16 * w, generator=g) * 2 - 1 for h, w in GRIDS]
    torch.manual_seed(seed)
    return dec(feats, Packing(GRIDS)), targets


@pytest.fixture(scope="module")
def frozen_batch(nets):
    with torch.no_grad():
        return _batch(nets.dec)


def _weights(**kw):
    base = dict(mse=1.0, lpips=0.5, kl=1e-3, repa=0.3, gan=GanWeights(weight=0.2, start_step=0, adaptive=False))
    base.update(kw)
    return DecoderLossWeights(**base)


def _loss(nets, w):
    return DecoderLoss(w, perceptual=nets.lpips, dino=nets.dino, discriminator=nets.disc)


def test_all_terms_and_total(nets):
    w = _weights()
    out, targets = _batch(nets.dec)
    terms = _loss(nets, w).generator_loss(out, targets, step=0)
    assert set(TERMS) <= set(terms) and "total" in terms
    expected = (w.mse * terms["mse"] + w.lpips * terms["lpips"] + w.kl * terms["kl"] + w.repa * terms["repa"]
                + terms["gan_weight"] * terms["gan"])
    assert torch.allclose(terms["total"], expected)
    assert float(terms["gan_weight"]) == pytest.approx(0.2)
    terms["total"].backward()
    assert nets.dec.last_layer.grad is not None and nets.dec.repa_proj[0].weight.grad is not None
    # the generator pass leaves the discriminator's gradients alone
    assert all(p.grad is None for p in nets.disc.parameters())
    nets.dec.zero_grad()


@pytest.mark.parametrize("off", TERMS)
def test_each_term_switches_off(nets, frozen_batch, off):
    kw = {off: 0.0} if off != "gan" else {"gan": GanWeights(weight=0.0)}
    w = _weights(**kw)
    # the net of a switched-off term is not needed
    loss = DecoderLoss(w, perceptual=None if off == "lpips" else nets.lpips, dino=None if off == "repa" else nets.dino,
                       discriminator=None if off == "gan" else nets.disc)
    out, targets = frozen_batch
    terms = loss.generator_loss(out, targets, step=5)
    assert off not in terms
    assert set(TERMS) - {off} <= set(terms)
    total = sum(getattr(w, n) * terms[n] for n in ("mse", "lpips", "kl", "repa") if n in terms)
    if "gan" in terms:
        total = total + terms["gan_weight"] * terms["gan"]
    assert torch.allclose(terms["total"], total)


def test_missing_network_for_an_enabled_term_is_an_error(nets):
    with pytest.raises(ConfigError, match="lpips"):
        DecoderLoss(_weights(), perceptual=None, dino=nets.dino, discriminator=nets.disc)
    with pytest.raises(ConfigError):
        DecoderLoss(_weights(mse=0, lpips=0, gan=GanWeights(weight=0)))
    dec = PixelDecoder(tiny_pixel_decoder_config())  # no REPA projector
    out, targets = _batch(dec)
    with pytest.raises(ConfigError, match="repa_dim"):
        _loss(nets, _weights()).generator_loss(out, targets, step=0)


def test_gan_starts_at_start_step(nets):
    loss = _loss(nets, _weights(gan=GanWeights(weight=0.1, start_step=10)))
    out, targets = _batch(nets.dec)
    before = loss.generator_loss(out, targets, step=9)
    assert "gan" not in before and "gan_weight" not in before
    assert loss.discriminator_loss(targets, out.images, step=9) == {}
    after = loss.generator_loss(out, targets, step=10, last_layer=nets.dec.last_layer)
    assert "gan" in after and float(after["gan_weight"]) > 0
    d = loss.discriminator_loss(targets, out.images, step=10)
    assert d["total"].requires_grad and d["disc"] is d["total"]
    d["total"].backward()
    assert all(p.grad is not None for p in nets.disc.parameters() if p.requires_grad)
    nets.disc.zero_grad()


def test_adaptive_weight_is_the_gradient_norm_ratio(nets):
    loss = _loss(nets, _weights(lpips=0, kl=0, repa=0, gan=GanWeights(weight=0.5, adaptive=True)))
    out, targets = _batch(nets.dec)
    terms = loss.generator_loss(out, targets, step=0, last_layer=nets.dec.last_layer)
    last = nets.dec.last_layer
    g_rec = torch.autograd.grad(terms["mse"], last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(terms["gan"], last, retain_graph=True)[0]
    expected = 0.5 * g_rec.norm() / (g_gan.norm() + 1e-4)
    assert torch.allclose(terms["gan_weight"], expected, rtol=1e-4)
    assert not terms["gan_weight"].requires_grad
    # clamped at the maximum
    x = torch.ones(3, requires_grad=True)
    assert float(adaptive_gan_weight((x * 1e9).sum(), (x * 1e-9).sum(), x, max_weight=7.0)) == 7.0


def test_gan_loss_values():
    real = [torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-2.0, 0.0]]), torch.tensor([[3.0]])]
    # hinge D: 0.5 * mean_images(mean relu(1 - r) + mean relu(1 + f))
    d = 0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2 + 2 + 4) / 2
    assert float(discriminator_gan_loss(real, fake, "hinge")) == pytest.approx(d)
    assert float(generator_gan_loss(fake, "hinge")) == pytest.approx(((2 + 0) / 2 + -3) / 2)
    sp = F.softplus
    t = torch.tensor
    d_ns = 0.5 * ((sp(t(-2.0)) + sp(t(-0.5))) / 2 + (sp(t(-2.0)) + sp(t(0.0))) / 2 + sp(t(1.0)) + sp(t(3.0))) / 2
    assert float(discriminator_gan_loss(real, fake, "non_saturating")) == pytest.approx(float(d_ns))
    g_ns = ((sp(torch.tensor(2.0)) + sp(torch.tensor(0.0))) / 2 + sp(torch.tensor(-3.0))) / 2
    assert float(generator_gan_loss(fake, "non_saturating")) == pytest.approx(float(g_ns))


def test_kl_and_repa_closed_forms():
    z = torch.zeros(4, 2, 3)
    assert float(kl_loss([z], [z])) == 0.0
    # KL(N(1, e^1) || N(0, 1)) per element = 0.5 * (1 + e - 1 - 1)
    assert float(kl_loss([z + 1], [z + 1])) == pytest.approx(24 * 0.5 * (math.e - 1))
    f = torch.randn(8, 3, 5)
    assert float(repa_loss([f], [f])) == pytest.approx(0.0, abs=1e-6)
    assert float(repa_loss([f], [-f])) == pytest.approx(2.0)
    assert float(repa_loss([f], [3 * f])) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError):
        repa_loss([f], [torch.randn(4, 3, 5)])


def test_weights_from_a_recipe_section():
    term = lambda enabled, weight: SimpleNamespace(enabled=enabled, weight=weight)  # noqa: E731
    section = SimpleNamespace(mse=term(True, 1.0), lpips=term(True, 0.3), kl=term(False, 1e-6), repa=term(True, 0.5),
                              gan=SimpleNamespace(enabled=True, weight=0.1, start_step=100, loss="non_saturating",
                                                  adaptive=False))
    w = DecoderLossWeights.from_section(section)
    assert (w.mse, w.lpips, w.kl, w.repa) == (1.0, 0.3, 0.0, 0.5)
    assert w.gan == GanWeights(weight=0.1, start_step=100, loss="non_saturating", adaptive=False)
    with pytest.raises(ValueError):
        DecoderLossWeights(msee=1.0)
