import pytest
import torch
from pydantic import ValidationError

from viq.errors import ConfigError
from viq.model.discriminator import PatchDiscriminator
from viq.model.pixel_decoder import PixelDecoder, PixelDecoderConfig, tiny_pixel_decoder_config
from viq.nn.vit import Packing

GRIDS = ((1, 1), (3, 5), (2, 3))


def _decoder(**kw) -> PixelDecoder:
    torch.manual_seed(0)
    return PixelDecoder(tiny_pixel_decoder_config(**kw))


def test_shapes_for_any_grid_and_backward():
    dec = _decoder(repa_dim=12).train()
    packing = Packing(GRIDS)
    feats = torch.randn(sum(h * w for h, w in GRIDS), 64, requires_grad=True)
    out = dec(feats, packing)
    for (h, w), img, hid, rep, mean, lv in zip(GRIDS, out.images, out.hidden, out.repa, out.mean, out.logvar):
        assert img.shape == (3, 16 * h, 16 * w)
        assert hid.shape == (32, h, w)
        assert rep.shape == (12, h, w)
        assert mean.shape == lv.shape == (4, h, w)
    sum(i.mean() for i in out.images).backward()
    assert feats.grad is not None and dec.last_layer.grad is not None


def test_without_bottleneck_or_projector():
    dec = _decoder(latent_channels=None).eval()
    out = dec(torch.randn(6, 64), Packing(((2, 3),)))
    assert out.mean is None and out.logvar is None and out.repa is None
    assert out.images[0].shape == (3, 32, 48)


def test_packed_equals_one_by_one_and_eval_is_deterministic():
    dec = _decoder().eval()
    a, b = torch.randn(15, 64), torch.randn(14, 64)
    packed = dec.decode(torch.cat([a, b]), Packing(((3, 5), (2, 7))))
    alone = [dec.decode(a, Packing(((3, 5),)))[0], dec.decode(b, Packing(((2, 7),)))[0]]
    for p, q in zip(packed, alone):
        assert torch.allclose(p, q, atol=1e-5)
        assert p.min() >= -1 and p.max() <= 1
    assert torch.equal(dec.decode(a, Packing(((3, 5),)))[0], alone[0])


def test_tiled_equals_untiled_with_channel_norm_and_tiles_stay_small():
    # patch 4 keeps the test fast (the tiling logic does not depend on the patch size); float64 so that
    # "equal" means the same computation, not rounding amplified by a random network.
    torch.manual_seed(0)
    cfg = PixelDecoderConfig(width=16, adapter_dim=16, adapter_heads=2, adapter_blocks=1, channels=[16, 8, 8],
                             res_blocks=0, mid_blocks=0, latent_channels=4, groups=2, patch=4)
    dec = PixelDecoder(cfg).double().eval()
    h, w = 26, 19
    feats = torch.randn(h * w, 16, dtype=torch.float64)
    full = dec.decode(feats, Packing(((h, w),)))[0]
    seen = []
    orig = dec.trunk
    dec.trunk = lambda x, sample: (seen.append(tuple(x.shape[-2:])), orig(x, sample))[1]
    tiled = dec.decode_tiled(feats, (h, w), tile=8, overlap=2)
    ctx = dec.default_context()
    assert tiled.shape == full.shape == (3, 4 * h, 4 * w)
    assert (tiled - full).abs().max() < 1e-10
    assert len(seen) >= 9 and all(a <= 8 + 2 * ctx and b <= 8 + 2 * ctx for a, b in seen)
    assert max(a * b for a, b in seen) < h * w
    # too little context is visibly inexact: the context is what makes tiles exact
    assert (dec.decode_tiled(feats, (h, w), tile=8, overlap=2, context=0) - full).abs().max() > 1e-4


def test_tiled_small_grid_and_group_norm():
    dec = _decoder().eval()
    feats = torch.randn(6, 64)
    full = dec.decode(feats, Packing(((2, 3),)))[0]
    assert (dec.decode_tiled(feats, (2, 3), tile=2, overlap=1) - full).abs().max() < 1e-5
    # GroupNorm keeps statistics over space: tiles without full context only approximate the whole image.
    torch.manual_seed(0)
    cfg = PixelDecoderConfig(width=16, adapter_dim=16, adapter_heads=2, adapter_blocks=1, channels=[8, 8, 8],
                             res_blocks=1, mid_blocks=0, latent_channels=None, groups=4, patch=4, norm="group")
    gdec = PixelDecoder(cfg).eval()
    f = torch.randn(20 * 14, 16)
    full = gdec.decode(f, Packing(((20, 14),)))[0]
    tiled = gdec.decode_tiled(f, (20, 14), tile=8, overlap=2, context=2)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    assert (tiled - full).abs().mean() < 0.1


def test_decode_tiled_rejects_bad_tiles_and_features():
    dec = _decoder().eval()
    with pytest.raises(ConfigError):
        dec.decode_tiled(torch.randn(4, 64), (2, 2), tile=2, overlap=2)
    with pytest.raises(ConfigError):
        dec(torch.randn(5, 64), Packing(((2, 2),)))
    with pytest.raises(ConfigError):
        dec(torch.randn(4, 32), Packing(((2, 2),)))


def test_config_validation():
    with pytest.raises(ValidationError):
        PixelDecoderConfig(channels=[64, 64, 64])  # patch 16 needs 5 entries
    with pytest.raises(ValidationError):
        PixelDecoderConfig(patch=12)
    with pytest.raises(ValidationError):
        PixelDecoderConfig(unknown=1)
    cfg = tiny_pixel_decoder_config()
    assert PixelDecoderConfig.model_validate(cfg.model_dump()) == cfg


def test_to_uint8():
    img = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 2, 2).expand(3, 2, 2)
    out = PixelDecoder.to_uint8(img)
    assert out.shape == (2, 2, 3) and out.dtype == torch.uint8
    assert out[..., 0].flatten().tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("spectral", [False, True])
def test_patch_discriminator_any_size(spectral):
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, layers=3, spectral_norm=spectral, norm="none" if spectral else "group",
                              groups=4)
    for h, w in ((16, 16), (48, 80), (24, 24), (64, 32)):
        logits = disc(torch.randn(2, 3, h, w))
        assert logits.shape[:2] == (2, 1) and logits.shape[2] >= 1 and logits.shape[3] >= 1
    assert disc(torch.randn(1, 3, disc.min_side, disc.min_side)).shape == (1, 1, 1, 1)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    disc(x).mean().backward()
    assert x.grad is not None


def test_decodes_the_demo_tokenizer_features_and_learns():
    from viq.tokenizer import load_tokenizer
    from viq.train.decoder_losses import mse_loss

    tok = load_tokenizer(parts=("encoder", "decoder"), device="cpu")
    pixels = torch.rand(3, 40, 23) * 2 - 1
    codes = tok.encode_pixels([pixels])
    feats = tok.embed(codes)[0]
    h, w = codes[0].shape[:2]
    assert (h, w) == (3, 2)
    torch.manual_seed(0)
    dec = PixelDecoder(tiny_pixel_decoder_config(width=tok.config.width, latent_channels=None)).train()
    target = torch.nn.functional.pad(pixels, (0, 16 * w - 23, 0, 16 * h - 40))
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        loss = mse_loss(dec(feats.clone(), Packing(((h, w),))).images, [target])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    img = PixelDecoder.to_uint8(dec.decode(feats.clone(), Packing(((h, w),)))[0])
    assert img.shape == (16 * h, 16 * w, 3)
