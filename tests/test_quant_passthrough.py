"""Pass-through quantizer and the limits shared with SimVQ; the quantizer factory."""

import pytest
import torch

from viq.errors import ConfigError
from viq.quant import FSQQuantizer, build_quantizer
from viq.quant.passthrough import Passthrough, apply_limit


def test_limits_do_what_they_say():
    x = torch.randn(50, 8) * 3
    assert torch.equal(apply_limit(x, "none"), x)
    assert torch.allclose(apply_limit(x, "l2").norm(dim=-1), torch.ones(50), atol=1e-6)
    linf = apply_limit(x, "l_infinite")
    assert torch.allclose(linf.abs().amax(dim=-1), torch.ones(50))  # on the unit hypercube's surface
    assert torch.allclose(linf * x.abs().amax(dim=-1, keepdim=True), x, atol=1e-5)  # a rescaling only
    assert torch.equal(apply_limit(x, "tanh"), torch.tanh(x))
    assert torch.isfinite(apply_limit(torch.zeros(2, 8), "l_infinite")).all()


def test_passthrough_has_no_codes_and_passes_gradients():
    q = Passthrough(8, "l_infinite")
    z = torch.randn(12, 8, requires_grad=True)
    out = q(z)
    assert out.indices is None and float(out.aux_loss) == 0.0 and out.codes.shape == (12, 8)
    out.codes.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert q.codebook_size is None and not list(q.parameters())


def test_factory_builds_every_family():
    fsq = build_quantizer("fsq", levels=[8, 5, 5])
    assert isinstance(fsq, FSQQuantizer) and fsq.dim == 3 and fsq.codebook_size == 200
    z = torch.randn(10, 3)
    out = fsq(z)
    assert out.indices.dtype == torch.int64 and int(out.indices.max()) < 200
    assert torch.equal(fsq.fsq.indices_to_codes(out.indices), out.codes.detach())
    assert build_quantizer("simvq", dim=4, codebook_size=16).codebook_size == 16
    assert build_quantizer("passthrough", dim=4, limit="tanh").limit == "tanh"


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="fsq"), "levels"),
    (dict(kind="simvq", dim=4), "codebook_size"),
    (dict(kind="passthrough"), "dim"),
    (dict(kind="passthrough", dim=4, limit="l3"), "limit"),
    (dict(kind="vq", dim=4), "unknown quantizer"),
])
def test_factory_errors_name_the_problem(kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=match):
        build_quantizer(kind, **kwargs)
