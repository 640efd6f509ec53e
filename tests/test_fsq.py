import math

import pytest
import torch

from viq.config import FSQ_PRESETS
from viq.quant.fsq import FSQ


@pytest.mark.parametrize("size", list(FSQ_PRESETS))
def test_index_code_round_trip_every_preset(size):
    levels = FSQ_PRESETS[size]
    fsq = FSQ(levels)
    k = math.prod(levels)
    assert fsq.codebook_size == k
    idx = torch.arange(k)
    codes = fsq.indices_to_codes(idx)
    assert codes.dtype == torch.float32 and codes.abs().max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # every code is distinct, and quantising a code's own value gives it back
    assert torch.unique(codes, dim=0).shape[0] == k
    table = fsq.codebook()
    assert torch.equal(table, codes)


@pytest.mark.parametrize("size", list(FSQ_PRESETS))
def test_quantize_uses_every_level_and_is_float32(size):
    fsq = FSQ(FSQ_PRESETS[size])
    z = torch.linspace(-6, 6, 4001).unsqueeze(1).expand(-1, fsq.dim).to(torch.bfloat16)
    codes = fsq.quantize(z)
    assert codes.dtype == torch.float32
    for i, lv in enumerate(FSQ_PRESETS[size]):
        assert torch.unique(codes[:, i]).numel() == lv
    idx = fsq.encode(z)
    assert idx.dtype == torch.int64 and int(idx.max()) < fsq.codebook_size


def test_index_order_first_dim_least_significant():
    fsq = FSQ([8, 8, 8, 6, 5])
    assert fsq.basis.tolist() == [1, 8, 64, 512, 3072]
    levels = fsq.indices_to_levels(torch.tensor([1 + 8 * 2 + 3072 * 4]))
    assert levels.tolist() == [[1, 2, 0, 0, 4]]


def test_round_half_to_even_and_straight_through():
    fsq = FSQ([5])
    # bound(z) = tanh(z) * 2.002 for odd L; pick z whose bound is exactly representable near .5
    z = torch.tensor([[0.0], [10.0], [-10.0]], requires_grad=True)
    codes = fsq.quantize(z)
    assert codes.squeeze(1).tolist() == [0.0, 1.0, -1.0]
    codes.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert torch.round(torch.tensor(2.5)) == 2  # the rounding FSQ relies on


def test_level_values_match_reference_table():
    fsq = FSQ([8, 6, 5, 4, 3])
    vals = [sorted(set(fsq.codebook()[:, i].tolist())) for i in range(5)]
    assert vals[0] == [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]
    assert vals[1] == pytest.approx([-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3])
    assert vals[2] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert vals[3] == [-1.0, -0.5, 0.0, 0.5]
    assert vals[4] == [-1.0, 0.0, 1.0]
