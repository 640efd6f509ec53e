"""SimVQ: frozen random codebook through a learnable map, nearest neighbour, commitment loss, rotation trick."""

import torch
import torch.nn.functional as F

from viq.quant.simvq import SimVQ, rotate_to


def test_codebook_is_frozen_base_through_learnable_map():
    q = SimVQ(8, 64, seed=3)
    assert not q.codebook_base.requires_grad and q.code_transform.weight.requires_grad
    assert torch.allclose(q.codebook(), q.codebook_base @ q.code_transform.weight.T, atol=1e-6)
    assert torch.equal(SimVQ(8, 64, seed=3).codebook_base, q.codebook_base)  # reproducible, own generator
    assert "codebook_base" in q.state_dict()  # persistent: checkpoints carry it


def test_nearest_neighbour_and_value():
    q = SimVQ(6, 32, seed=0)
    z = torch.randn(40, 6)
    out = q(z)
    cb = q.codebook().detach()
    expect = torch.cdist(z, cb).argmin(dim=-1)
    assert torch.equal(out.indices, expect)
    assert torch.allclose(out.codes, cb[expect], atol=1e-5)  # rotation trick: the value is the code
    assert torch.allclose(q.lookup(out.indices), cb[expect], atol=1e-6)


def test_commitment_loss_and_gradients():
    q = SimVQ(6, 32, seed=0, beta=0.25)
    z = torch.randn(40, 6, requires_grad=True)
    out = q(z)
    cb = q.codebook().detach()[out.indices]
    expect = F.mse_loss(cb, z.detach()) * 1.25  # both terms have the same value
    assert torch.allclose(out.aux_loss, expect, atol=1e-6)
    (out.codes.sum() + out.aux_loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # through the rotation trick
    assert q.code_transform.weight.grad is not None and q.code_transform.weight.grad.abs().sum() > 0


def test_rotation_maps_z_to_q():
    z = torch.randn(20, 5, requires_grad=True)
    qv = torch.randn(20, 5)
    out = rotate_to(z, qv)
    assert torch.allclose(out, qv, atol=1e-5)
    # the gradient is a scaled rotation: it preserves norms up to |q| / |z|
    g = torch.randn(20, 5)
    (out * g).sum().backward()
    ratio = qv.norm(dim=-1) / z.detach().norm(dim=-1)
    assert torch.allclose(z.grad.norm(dim=-1), g.norm(dim=-1) * ratio, rtol=1e-4)


def test_limit_applies_after_lookup():
    q = SimVQ(6, 32, limit="l2")
    out = q(torch.randn(10, 6))
    assert torch.allclose(out.codes.norm(dim=-1), torch.ones(10), atol=1e-5)
