"""The frozen teacher and SigLIP2 open_clip/timm weights loaded into our ViT (position grid resized)."""

import pytest
import torch
import torch.nn.functional as F

from viq.config import ViTConfig
from viq.errors import WeightsError
from viq.model.student import new_vit
from viq.nn.vit import AnyResViT
from viq.train.recipe.sections import TeacherSection
from viq.train.teacher import Teacher, build_teacher, load_siglip2_openclip, resize_pos_embed

VIT = dict(width=32, depth=2, heads=4, mlp_hidden=64)


def openclip_file(tmp_path, grid=6):
    """A fake open_clip SigLIP2 checkpoint: visual.trunk.* (timm names) plus text-tower keys."""
    src = new_vit(ViTConfig(**VIT, pos_grid=grid), True, seed=11)
    sd = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.randn(10, 32)
    sd["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    return path, src


def test_student_init_resizes_the_position_grid(tmp_path):
    path, src = openclip_file(tmp_path, grid=6)
    vit = AnyResViT(ViTConfig(**VIT, pos_grid=16))
    notes = load_siglip2_openclip(path, vit)
    assert notes == ["pos_embed 6x6 -> 16x16 (bicubic)"]
    assert torch.equal(vit.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(vit.attn_pool.latent, src.attn_pool.latent)
    expect = resize_pos_embed(src.pos_embed.detach(), 16)
    assert torch.equal(vit.pos_embed.detach(), expect)
    # bicubic upsampling keeps the grid's corners near the original corners
    assert torch.allclose(vit.pos_embed[0, 0], src.pos_embed[0, 0], atol=0.05)


def test_wrong_architecture_is_refused(tmp_path):
    path, _ = openclip_file(tmp_path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_siglip2_openclip(path, AnyResViT(ViTConfig(width=32, depth=3, heads=4, mlp_hidden=64, pos_grid=16)))


def test_teacher_from_checkpoint_keeps_its_native_grid(tmp_path):
    path, src = openclip_file(tmp_path, grid=6)
    t = build_teacher(TeacherSection(ckpt=str(path), input_resolution=96), ViTConfig(**VIT, pos_grid=16))
    assert t.vit.cfg.pos_grid == 6 and not any(p.requires_grad for p in t.parameters())
    img = torch.rand(3, 50, 70) * 2 - 1
    feat = t([img])
    # the same as running the source ViT on the 96x96 bilinear resize (6x6 grid: no position resampling)
    x = F.interpolate(img[None], size=(96, 96), mode="bilinear", align_corners=False)[0]
    tokens, _ = src([x])
    assert feat.shape == (1, 32) and torch.allclose(feat[0], src.pool(tokens), atol=1e-5)
    t.train()
    assert not t.training  # always eval


def test_random_teacher_is_the_students_initial_vit():
    cfg = ViTConfig(**VIT, pos_grid=8)
    t = build_teacher(TeacherSection(ckpt=None, input_resolution=64), cfg, seed=4)
    s = new_vit(cfg, True, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(t.vit.state_dict().values(), s.state_dict().values()))
    feats = t([torch.rand(3, 40, 90), torch.rand(3, 128, 32)])
    assert feats.shape == (2, 32) and feats.dtype == torch.float32
    assert isinstance(t, Teacher)
