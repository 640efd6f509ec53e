"""The packed attention paths: the PyTorch fallback is block-diagonal, and the flash-attn varlen call
gets the layout it expects (checked with a stand-in, since flash-attn needs CUDA)."""

import pytest
import torch

from viq.config import tiny_config
from viq.model.viq_model import ViQModel
from viq.nn import attention
from viq.nn.attention import Segments, packed_attention


def test_fallback_is_block_diagonal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    seg = Segments((3, 4))
    out = packed_attention(q, k, v, seg, 8 ** -0.5, use_flash=False)
    mask = torch.full((7, 7), float("-inf"))
    mask[:3, :3] = 0
    mask[3:, 3:] = 0
    ref = torch.softmax((q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2)) * 8 ** -0.5 + mask, -1) @ v.transpose(0, 1)
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_flash_varlen_call_layout(monkeypatch):
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
        calls.append((q.shape, cu_q.tolist(), max_q, causal))
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and not causal
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        return packed_attention(q, k, v, Segments(tuple(lens)), softmax_scale, use_flash=False)

    monkeypatch.setattr(attention, "_flash_varlen", fake_varlen)
    monkeypatch.setattr(attention, "flash_available", lambda t: True)
    torch.manual_seed(0)
    model = ViQModel(tiny_config()).eval()
    ims = [torch.rand(3, 32, 48) * 2 - 1, torch.rand(3, 16, 16) * 2 - 1]
    with torch.no_grad():
        idx_flash, _ = model.encode(ims)
    assert calls and calls[0][1] == [0, 6, 7]
    monkeypatch.setattr(attention, "flash_available", lambda t: False)
    with torch.no_grad():
        idx_ref, _ = model.encode(ims)
    assert torch.equal(idx_flash, idx_ref)


def test_bfloat16_run_keeps_fsq_in_float32():
    torch.manual_seed(0)
    model = ViQModel(tiny_config("64k")).eval()
    ims = [torch.rand(3, 64, 80) * 2 - 1]
    with torch.no_grad():
        idx32, _ = model.encode(ims)
        z = model.head.pre_quant(*model.vit(ims))
        model_bf = model.to(torch.bfloat16)
        idx16, _ = model_bf.encode(ims)
    assert idx16.dtype == torch.int64 and int(idx16.max()) < 64000
    assert model_bf.head.fsq.quantize(z.to(torch.bfloat16)).dtype == torch.float32
    agree = (idx16 == idx32).float().mean().item()
    assert agree > 0.3  # bf16 flips codes near bin edges, not wholesale


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_every_cpu_backend_matches_the_loop(monkeypatch):
    # FlexAttention runs uncompiled here: our part (padding, the block mask, the layout) is the same,
    # and compiling it costs ~20 s of CPU; benchmarks/gpu_check.py compares the compiled kernel.
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attention, "_compiled_flex", lambda: flex_attention)
    torch.manual_seed(0)
    seg = Segments((5, 130, 1, 40))
    q, k, v = (torch.randn(seg.total, 2, 8) for _ in range(3))
    ref = packed_attention(q, k, v, seg, 0.3, backend="loop")
    for name in attention.available_backends(q):
        out = packed_attention(q, k, v, seg, 0.3, backend=name)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
    assert attention.default_backend(q) == "loop"  # the exact path stays the CPU default


def test_forced_backend_gives_the_same_codes():
    torch.manual_seed(0)
    model = ViQModel(tiny_config(), parts=("encoder",)).eval()
    ims = [torch.rand(3, 32, 48) * 2 - 1, torch.rand(3, 16, 16) * 2 - 1, torch.rand(3, 48, 16) * 2 - 1]
    with torch.no_grad():
        ref, _ = model.encode(ims)
        with attention.attention_backend("nested"):
            nested, _ = model.encode(ims)
    assert torch.equal(ref, nested)


def test_cumulative_lengths_are_built_once_and_serve_training_too():
    """Every layer asks for them; built again, each layer on a GPU would wait for a host-to-device copy."""
    seg = Segments((3, 4, 2))
    with torch.inference_mode():
        first = seg.cu_seqlens("cpu")
    assert first.tolist() == [0, 3, 7, 9] and first.dtype == torch.int32
    assert Segments((3, 4, 2)).cu_seqlens(torch.device("cpu")) is first and not first.is_inference()
    starts, groups = attention._equal_length_groups((3, 3, 2), torch.device("cpu"))
    assert starts == [0, 3, 6] and [g[2].tolist() for g in groups] == [[0, 1, 2, 3, 4, 5], [6, 7]]
