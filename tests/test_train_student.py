"""The trainable student: every quantizer family, freezing rules, export to viq's weights format."""

import pytest
import torch

from viq.config import tiny_config
from viq.errors import ConfigError
from viq.model.student import Student
from viq.quant import build_quantizer
from viq.weights.formats import load_model
from viq.weights.save import save_viq

CFG = tiny_config("4k", width=32, depth=1, heads=4, pos_grid=8)
IMAGES = [torch.rand(3, 48, 64) * 2 - 1, torch.rand(3, 32, 32) * 2 - 1]


@pytest.mark.parametrize("kind", ["fsq", "simvq", "passthrough"])
def test_every_quantizer_trains_end_to_end(kind):
    q = None if kind == "fsq" else build_quantizer(kind, dim=6, codebook_size=32 if kind == "simvq" else None,
                                                   limit="l_infinite")
    s = Student(CFG, q, drawer=True, seed=1)
    out = s(IMAGES, pool_from="head", draw=True, feat_rec=True)
    t = 3 * 4 + 2 * 2
    assert out.features.shape == (t, 32) and out.pooled.shape == (2, 32)
    assert [tuple(lat.shape) for lat in out.latents] == [(1, 16, 6, 8), (1, 16, 4, 4)]
    assert (out.indices is None) == (kind == "passthrough")
    if out.indices is not None:
        assert out.indices.shape == (4 * t,) and int(out.indices.max()) < s.codebook_size
    loss = out.features.square().mean() + out.pooled.sum() + sum(lat.mean() for lat in out.latents) \
        + out.aux_loss + out.feat_rec
    loss.backward()
    project_in = s.head.project_in if kind == "fsq" else s.bottleneck.project_in
    assert project_in.weight.grad.abs().sum() > 0  # straight through the quantizer
    assert s.vit.pos_embed.grad is not None
    assert all(p.grad is None for p in s.drawer.vae.parameters())  # the VAE is frozen
    if kind != "fsq":  # a training-only bottleneck beside the inference head, whose FSQ projections idle
        assert s.bottleneck.project_in.weight.shape == (6, 32) and s.head.project_in.weight.shape == (5, 32)
        assert s.head.project_in.weight.grad is None and not s.head.project_in.weight.requires_grad
        assert set(s.idle_keys) <= set(s.state_dict()) and "head.codebook" in s.idle_keys


def test_student_is_the_inference_model_plus_training_parts():
    from viq.model.viq_model import ViQModel

    for q in (None, build_quantizer("passthrough", dim=4, limit="tanh")):
        s = Student(CFG, q, drawer=True)
        assert isinstance(s, ViQModel) and s.parts == ("encoder", "pool", "decoder", "drawer")
        with torch.device("meta"):
            inference = ViQModel(CFG, s.parts).state_dict()
        assert {k: tuple(v.shape) for k, v in s.inference_state().items()} == \
            {k: tuple(v.shape) for k, v in inference.items()}
        extra = {k.split(".")[0] for k in s.state_dict() if k not in inference}
        assert extra <= {"quantizer", "bottleneck"} and ("bottleneck" in extra) == (q is not None)
    s = Student(CFG, seed=3)
    assert s.viq_state().keys() == s.inference_state().keys()
    assert all(torch.equal(s.viq_state()[k], v) for k, v in s.state_dict().items() if k in s.viq_state())


def test_freezing_rules():
    s = Student(CFG, drawer=True)
    s.set_trainable(vit=False, pool=True, head=True, head_pre_blocks=False, drawer=True)
    assert not s.vit.blocks[0].attn.qkv.weight.requires_grad and s.vit.attn_pool.latent.requires_grad
    assert not s.head.pre_blocks[0].mlp.fc1.weight.requires_grad and s.head.project_in.weight.requires_grad
    assert not any(p.requires_grad for p in s.drawer.vae.parameters())
    s.set_trainable(vit=True, vit_mlp_norm=False)
    assert s.vit.blocks[0].attn.qkv.weight.requires_grad and not s.vit.blocks[0].mlp.fc1.weight.requires_grad
    assert not s.vit.blocks[0].norm1.weight.requires_grad and s.vit.norm.weight.requires_grad


def test_fsq_student_exports_to_viq_weights(tmp_path):
    s = Student(CFG, drawer=True, seed=2).eval()
    save_viq(s.viq_state(), CFG, tmp_path / "viq")
    model, _, _ = load_model(tmp_path / "viq", parts=("encoder", "decoder", "pool", "drawer"))  # strict
    with torch.no_grad():
        out = s(IMAGES, draw=True)
        idx, _ = model.encode(IMAGES)
        assert torch.equal(idx, out.indices)
        assert torch.allclose(model.embed(idx), out.features, atol=1e-5)
        lat = model.draw_latents(model.embed(idx), out.packing)
        assert torch.allclose(lat[0], out.latents[0], atol=1e-5)


def test_only_fsq_students_export():
    s = Student(CFG, build_quantizer("passthrough", dim=4, limit="tanh"))
    with pytest.raises(ConfigError, match="FSQ"):
        s.viq_state()
    with pytest.raises(ConfigError, match="drawer"):
        Student(CFG, head=False, drawer=True)


def test_no_head_student_is_the_vit():
    s = Student(CFG, head=False)
    out = s(IMAGES, pool_from="vit")
    assert torch.equal(out.features, out.tokens) and out.indices is None and s.viq_parts() == ("pool",)
