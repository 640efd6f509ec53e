import math

import torch

from viq.config import RopeConfig
from viq.nn.rope2d import apply_rope, grid_angles, rope_frequencies


def test_frequencies_zero_share_and_range():
    f = rope_frequencies(256, 4, RopeConfig())
    assert f.shape == (4, 128, 2)
    mags = f.norm(dim=-1)
    assert torch.all(mags[:, :32] == 0)
    assert torch.allclose(mags[0, 32], torch.tensor(0.2)) and torch.allclose(mags[0, -1], torch.tensor(20.0))
    # direction of slot j, frequency k is (128 j + k) * golden angle
    ang = torch.atan2(f[1, 40, 1], f[1, 40, 0])
    expected = (128 + 40) * RopeConfig().direction_spacing
    assert abs(math.remainder(ang.item() - expected, 2 * math.pi)) < 1e-4


def test_positions_are_aspect_normalised_and_centred():
    f = rope_frequencies(8, 1, RopeConfig(p_zero_freqs=0.0))
    th = grid_angles(f, (2, 8))
    assert th.shape == (16, 1, 4)
    # the centre-symmetric patches have opposite angles
    assert torch.allclose(th[0], -th[15], atol=1e-6)


def test_rotation_preserves_norm_and_relative_property():
    torch.manual_seed(0)
    d = 16
    f = rope_frequencies(d, 1, RopeConfig(p_zero_freqs=0.0))
    th = grid_angles(f, (3, 5))[:, 0]  # (15, 8)
    q, k = torch.randn(d), torch.randn(d)
    rq = apply_rope(q.expand(15, d), th)
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(15), atol=1e-5)
    # attention score depends only on the angle difference: shifting both by the same angle keeps it
    s1 = (apply_rope(q, th[2]) * apply_rope(k, th[7])).sum()
    s2 = (apply_rope(q, th[2] + 0.3) * apply_rope(k, th[7] + 0.3)).sum()
    assert torch.allclose(s1, s2, atol=1e-4)


def test_theta_is_rounded_to_input_dtype_before_cos_sin():
    f = rope_frequencies(8, 1, RopeConfig(p_zero_freqs=0.0))
    th = grid_angles(f, (4, 4))[:, 0] * 10
    x = torch.randn(16, 8).to(torch.bfloat16)
    ours = apply_rope(x, th)
    t = th.to(torch.bfloat16)
    a, b = x.chunk(2, -1)
    ref = torch.cat((a * torch.cos(t) - b * torch.sin(t), a * torch.sin(t) + b * torch.cos(t)), -1)
    assert torch.equal(ours, ref)
