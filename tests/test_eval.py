import math

import numpy as np
import pytest
import torch
from PIL import Image

from viq.errors import ConfigError, WeightsError
from viq.eval import (FeatureStats, bits_per_pixel, codebook_usage, evaluate, frechet_distance, image_grid,
                      load_dinov2, load_fid_net, load_lpips, psnr, rfid, ssim)
from viq.eval.fid import FidInception
from viq.eval.perceptual import LPIPS, lpips_key_map


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- PSNR / SSIM ---------------------------------------------------------------------------------------
def test_psnr_of_a_constant_offset_and_identity():
    a = np.full((20, 30, 3), 100, np.uint8)
    for d in (1, 5, 50):
        assert psnr(a, a + np.uint8(d)) == pytest.approx(10 * math.log10(255 ** 2 / d ** 2))
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0, 0, 0] = 110  # MSE = 100 / (20 * 30 * 3)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 * 1800 / 100))
    with pytest.raises(ConfigError):
        psnr(a, a[:10])


def test_ssim_identity_constants_and_noise():
    x = _img(40, 33)
    assert ssim(x, x) == pytest.approx(1.0)
    c1 = (0.01 * 255) ** 2
    a, b = np.full((16, 16, 3), 50, np.uint8), np.full((16, 16, 3), 200, np.uint8)
    # constant images: variances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    assert ssim(a, b) == pytest.approx((2 * 50 * 200 + c1) / (50 ** 2 + 200 ** 2 + c1))
    y = np.clip(x.astype(int) + np.random.default_rng(1).integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    s = ssim(x, y)
    assert 0 < s < 1 and s == pytest.approx(ssim(y, x))
    # per channel: damaging one channel lowers SSIM by a third of that channel's loss
    z = x.copy()
    z[..., 1] = y[..., 1]
    one = ssim(x[..., 1:2].repeat(3, 2), z[..., 1:2].repeat(3, 2))
    assert ssim(x, z) == pytest.approx((2 + one) / 3)
    assert ssim(_img(8, 9), _img(8, 9)) == pytest.approx(1.0)  # smaller than the window


# ---- codebook usage and bits per pixel -------------------------------------------------------------------
def test_codebook_usage_on_known_distributions():
    k = 16
    uniform = torch.arange(k).view(2, 2, 4)  # every code once
    u = codebook_usage([uniform], k)
    assert u["usage"] == 1.0 and u["perplexity"] == pytest.approx(k) and u["entropy_bits"] == pytest.approx(4.0)
    single = torch.full((3, 5, 4), 7)
    s = codebook_usage([single], k)
    assert s["used"] == 1 and s["usage"] == 1 / k and s["perplexity"] == pytest.approx(1.0)
    # slot j always holds code j: each slot uses one code, all slots together four equally often
    slots = torch.arange(4).view(1, 1, 4).expand(3, 2, 4)
    r = codebook_usage([slots, slots[:1]], k)
    assert r["codes"] == 32 and r["perplexity"] == pytest.approx(4.0) and r["usage"] == 4 / k
    assert [p["perplexity"] for p in r["per_slot"]] == pytest.approx([1.0] * 4)
    assert [p["used"] for p in r["per_slot"]] == [1] * 4
    # two codes at 1/4 and 3/4
    two = torch.tensor([0, 1, 1, 1]).view(1, 1, 4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert codebook_usage([two], k)["perplexity"] == pytest.approx(math.exp(h))
    with pytest.raises(ConfigError):
        codebook_usage([torch.full((1, 1, 4), k)], k)
    with pytest.raises(ConfigError):
        codebook_usage([torch.zeros(2, 2, 3, dtype=torch.long)], k)


def test_bits_per_pixel():
    k = 15360
    out = bits_per_pixel([(2, 3), (1, 1)], k, original_sizes=[(30, 40), (10, 12)])
    bits = math.log2(k) * 4 * 7
    assert out["bits"] == pytest.approx(bits)
    assert out["bpp_padded"] == pytest.approx(math.log2(k) * 4 / 256)
    assert out["bpp_original"] == pytest.approx(bits / (30 * 40 + 10 * 12))
    assert bits_per_pixel([(2, 3)], k)["bpp_original"] is None


# ---- Fréchet distance and rFID -----------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d1, d2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu2 = mu + 1.5
    expected = 6 * 1.5 ** 2 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected)
    # S1 = c I, S2 = Q diag(l) Q^T: tr sqrt(S1 S2) = sqrt(c) * sum sqrt(l)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lam = rng.uniform(0.1, 3, 6)
    s2 = q @ np.diag(lam) @ q.T
    c = 2.0
    expected = 6 * c + lam.sum() - 2 * math.sqrt(c) * np.sqrt(lam).sum()
    assert frechet_distance(np.zeros(6), c * np.eye(6), np.zeros(6), s2) == pytest.approx(expected)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))


def test_feature_stats_match_numpy():
    f = np.random.default_rng(0).normal(size=(50, 5))
    st = FeatureStats(5)
    st.update(f[:20])
    st.update(f[20:])
    mu, cov = st.mean_cov()
    assert np.allclose(mu, f.mean(0)) and np.allclose(cov, np.cov(f, rowvar=False))


def test_rfid_with_a_tiny_net():
    net = load_fid_net(tiny=True)
    imgs = [_img(40, 56, seed=i) for i in range(6)]
    assert rfid(imgs, imgs, net) == pytest.approx(0.0, abs=1e-6)
    other = [np.zeros_like(i) + np.uint8(30) for i in imgs]
    assert rfid(imgs, [np.clip(i // 2 + o, 0, 255).astype(np.uint8) for i, o in zip(imgs, other)], net) > 0
    with pytest.raises(ConfigError):
        rfid(imgs[:1], imgs[:1], net)


def test_fid_inception_architecture_and_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    net = FidInception().eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 21_785_568  # torchvision's Inception3 without the aux head and the 1008-way fc
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # ignored on load
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = load_fid_net(tmp_path / "pt_inception.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items() if not k.startswith("fc."))
    with torch.no_grad():
        assert loaded(torch.rand(1, 3, 64, 48)).shape == (1, 2048)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError):
        load_fid_net(tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="viqctl download inception-fid"):
        load_fid_net(tmp_path / "nope.pth")


# ---- perceptual nets ---------------------------------------------------------------------------------------
def test_lpips_tiny_identity_and_difference():
    net = load_lpips(tiny=True)
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    y = torch.rand(2, 3, 40, 24) * 2 - 1
    assert torch.equal(net(x, x), torch.zeros(2))
    d = net(x, y)
    assert (d > 0).all() and torch.allclose(d, net(y, x))
    assert (net(x, 0.9 * x + 0.1 * y) < d).all()
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ConfigError):
        net(x, y[:, :, :20])


def test_lpips_loads_torchvision_and_lpips_layouts(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    sd = ref.state_dict()
    vgg = {k.replace("vgg.", "features.", 1): v for k, v in sd.items() if k.startswith("vgg.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's head: ignored
    lins = {f"lin{k.split('.')[1]}.model.1.weight": v for k, v in sd.items() if k.startswith("lins.")}
    from safetensors.torch import save_file

    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save(lins, tmp_path / "vgg.pth")
    net = load_lpips(tmp_path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    # the lpips package's own module names map the same way
    assert set(lpips_key_map({"net.slice2.5.weight": 0, "lin3.model.1.weight": 0, "lins.3.model.1.weight": 0,
                              "scaling_layer.shift": 0})) == {"vgg.5.weight", "lins.3.weight"}
    (tmp_path / "vgg.pth").unlink()
    with pytest.raises(WeightsError, match="lin layers"):
        load_lpips(tmp_path)
    with pytest.raises(WeightsError, match="pip install lpips"):
        load_lpips(tmp_path / "missing")
    with pytest.raises(WeightsError, match="vgg16-397923af.pth"):
        load_lpips(None)


def test_dinov2_tiny_and_local_directory(tmp_path):
    dino = load_dinov2(tiny=True)
    x = torch.rand(2, 3, 48, 80) * 2 - 1
    feats = dino(x, (3, 5))
    assert feats.shape == (2, dino.dim, 3, 5)
    dino.model.save_pretrained(tmp_path / "dino")
    again = load_dinov2(tmp_path / "dino")
    assert torch.allclose(again(x, (3, 5)), feats, atol=1e-5)
    with pytest.raises(WeightsError, match="viqctl download dinov2-base"):
        load_dinov2(tmp_path / "empty")


# ---- report ---------------------------------------------------------------------------------------------------
def test_evaluate_and_image_grid(tmp_path):
    origs = [_img(40, 50, 1), _img(33, 17, 2), _img(16, 16, 3)]
    # reconstructions at the padded size; the extra rows/columns must be cropped away
    recons = []
    for o in origs:
        h, w = -(-o.shape[0] // 16) * 16, -(-o.shape[1] // 16) * 16
        r = np.zeros((h, w, 3), np.uint8)
        r[:o.shape[0], :o.shape[1]] = np.clip(o.astype(int) + 3, 0, 255)
        recons.append(r)
    recons[2] = np.pad(origs[2], ((0, 0), (0, 0), (0, 0)))  # identical pair
    codes = [torch.randint(0, 64, (-(-o.shape[0] // 16), -(-o.shape[1] // 16), 4)) for o in origs]
    rep = evaluate(origs, recons, codes, 64, perceptual=load_lpips(tiny=True), fid_net=load_fid_net(tiny=True))
    assert rep["images"] == 3 and rep["psnr_identical"] == 1
    assert rep["per_image"][2]["psnr"] == math.inf and rep["per_image"][2]["lpips"] == 0.0
    assert rep["psnr"] == pytest.approx(np.mean([psnr(origs[i], recons[i][:origs[i].shape[0], :origs[i].shape[1]])
                                                 for i in range(2)]))
    assert 0 < rep["ssim"] <= 1 and rep["lpips"] >= 0 and rep["rfid"] >= 0
    assert rep["codebook"]["codebook_size"] == 64 and len(rep["codebook"]["per_slot"]) == 4
    assert rep["bits_per_pixel"]["bpp_padded"] == pytest.approx(6 * 4 / 256)
    assert rep["bits_per_pixel"]["bpp_original"] > rep["bits_per_pixel"]["bpp_padded"]
    plain = evaluate(origs, recons, codes, 64)
    assert plain["lpips"] is None and plain["rfid"] is None
    with pytest.raises(ConfigError):
        evaluate(origs, recons[:2], codes, 64)
    with pytest.raises(ConfigError):
        evaluate([_img(40, 40)], [_img(32, 32)], codes[:1], 64)

    path = image_grid(origs, recons, tmp_path / "out" / "grid.png", max_side=32)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    im = Image.open(path)
    assert im.mode == "RGB" and im.width >= 2 * 32 and im.height > 3 * 16
