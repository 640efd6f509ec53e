"""Packed (variable-length) attention: several images in one sequence, each attending only to itself.

Backends, all computing the same function (up to float rounding):

* ``loop``: scaled-dot-product attention segment by segment. Exact, runs everywhere; the CPU default
  (measured fastest there: the others fall back to materialising scores or add dispatch cost).
* ``flash``: flash-attn's varlen kernel (``pip install viq[flash]``), CUDA half/bf16 only.
* ``varlen``: torch's own varlen kernel (``torch.nn.attention.varlen``, the flash kernels shipped
  in torch), CUDA half/bf16 only.
* ``nested``: SDPA on a nested jagged tensor (torch picks flash / memory-efficient kernels on CUDA).
* ``flex``: compiled FlexAttention with a block-diagonal block mask.

``auto`` picks flash when installed, else torch's varlen kernel, on CUDA in half precision, and the
loop otherwise. ``benchmarks/gpu_check.py`` times every backend on the GPU it runs on, so the CUDA
default can be confirmed by measurement; ``attention_backend(name)`` forces one for a block of code.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional extra: pip install viq[flash]
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # pragma: no cover - not installable without CUDA
    _flash_varlen = None

BACKENDS = ("auto", "loop", "flash", "varlen", "nested", "flex")
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("viq_attention_backend", default="auto")


@dataclass(frozen=True)
class Segments:
    """Lengths of the images packed into one sequence (in tokens)."""

    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def cu_seqlens(self, device) -> torch.Tensor:
        """int32 cumulative lengths on ``device``; cached, since every layer asks for the same ones
        (building them again is a host-to-device copy that waits for the GPU, once per layer)."""
        return _cu_seqlens_on(self.lengths, torch.device(device))

    def scaled(self, factor: int) -> "Segments":
        return Segments(tuple(n * factor for n in self.lengths))


@functools.lru_cache(maxsize=64)
def _cu_seqlens_on(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: must stay usable by a later training forward
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device)


@contextlib.contextmanager
def attention_backend(name: str):
    """Run the enclosed code with one packed-attention backend (``auto`` restores the default)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """torch's varlen kernel (torch >= 2.9), imported on first use: the import pulls in torch._dynamo
    (seconds and ~100 MB), which a CPU encode never needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # pragma: no cover - older torch
        return None
    import inspect

    if "scale" not in inspect.signature(varlen_attn).parameters:  # pragma: no cover - its first release had none
        return None
    return varlen_attn


def _cuda_half(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def flash_available(t: torch.Tensor) -> bool:
    return _flash_varlen is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def available_backends(t: torch.Tensor) -> list[str]:
    """The backends that can run on ``t``'s device and dtype."""
    out = ["loop", "nested", "flex"]
    if _cuda_half(t) and _torch_varlen() is not None:
        out.insert(1, "varlen")
    if flash_available(t):
        out.insert(1, "flash")
    return out


def default_backend(t: torch.Tensor) -> str:
    if flash_available(t):
        return "flash"
    if _cuda_half(t) and _torch_varlen() is not None:
        return "varlen"
    return "loop"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     scale: float, use_flash: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """Non-causal attention per segment. q, k, v: (T, heads, head_dim) -> (T, heads, head_dim).

    ``use_flash`` (kept for callers that predate ``backend``): True = flash, False = loop.
    """
    if backend is None or backend == "auto":
        backend = _forced.get()
    if use_flash is not None:
        backend = "flash" if use_flash else "loop"
    if backend == "auto":
        backend = default_backend(q)
    if backend == "flash":
        cu = segments.cu_seqlens(q.device)
        return _flash_varlen(q, k, v, cu, cu, segments.max_len, segments.max_len,
                             softmax_scale=scale, causal=False)
    if len(segments.lengths) == 1 or backend == "loop":
        return _loop(q, k, v, segments, scale)
    if backend == "varlen":
        cu = segments.cu_seqlens(q.device)
        return _torch_varlen()(q, k, v, cu, cu, segments.max_len, segments.max_len, scale=scale)
    if backend == "nested":
        return _nested(q, k, v, segments, scale)
    if backend == "flex":
        return _flex(q, k, v, segments, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _sdpa(q, k, v, scale):
    # (L, H, D) -> (1, H, L, D) for SDPA and back.
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], scale=scale)
    return o[0].transpose(0, 1)


def _loop(q, k, v, segments: Segments, scale):
    """Exact per-image attention, with images of equal length batched into one SDPA call: the CPU
    kernel treats every (batch, head) alone, so the values are those of one call per image (tested),
    while many small images cost a call per distinct length instead of one each."""
    lengths = segments.lengths
    if len(lengths) == 1:
        return _sdpa(q, k, v, scale)
    starts, groups = _equal_length_groups(lengths, q.device)
    if len(groups) == len(lengths):  # all lengths differ: one call each, no gathering
        return torch.cat([_sdpa(q[s:s + n], k[s:s + n], v[s:s + n], scale) for s, n in zip(starts, lengths)])
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    for n, members, rows in groups:
        if len(members) == 1:
            s = starts[members[0]]
            out[s:s + n] = _sdpa(q[s:s + n], k[s:s + n], v[s:s + n], scale)
            continue
        b = len(members)
        qg, kg, vg = (x.index_select(0, rows).view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)  # (B, H, n, D)
        out.index_copy_(0, rows, o.transpose(1, 2).reshape(b * n, *out.shape[1:]))
    return out


@functools.lru_cache(maxsize=64)
def _equal_length_groups(lengths: tuple[int, ...], device: torch.device):
    """Start of each segment, and per distinct length: (length, member segments, their token rows on
    ``device``). Cached: every layer of a batch asks for the same packing."""
    starts, members = [], {}
    at = 0
    for i, n in enumerate(lengths):
        starts.append(at)
        members.setdefault(n, []).append(i)
        at += n
    with torch.inference_mode(False):  # cached: must stay usable by a later training forward
        groups = [(n, idx, torch.cat([torch.arange(starts[i], starts[i] + n) for i in idx]).to(device))
                  for n, idx in members.items()]
    return starts, groups


def _nested(q, k, v, segments: Segments, scale):
    offsets = segments.cu_seqlens(q.device).to(torch.int64)
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets).transpose(1, 2)
                  for x in (q, k, v))
    o = F.scaled_dot_product_attention(nq, nk, nv, scale=scale)  # (B, H, j, D)
    return o.transpose(1, 2).values()


FLEX_BLOCK = 128  # FlexAttention's block size: sequences are padded to it (fewer recompiles too)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=64)
def _block_mask(lengths: tuple[int, ...], padded: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    total = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc = torch.cat((doc, torch.full((padded - total,), -1, dtype=doc.dtype))).to(device)  # padding: its own block

    def same_image(b, h, qi, ki):
        return doc[qi] == doc[ki]

    return create_block_mask(same_image, None, None, padded, padded, device=device)


def _flex(q, k, v, segments: Segments, scale):
    t = q.shape[0]
    padded = -(-t // FLEX_BLOCK) * FLEX_BLOCK
    mask = _block_mask(segments.lengths, padded, str(q.device))
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, padded - t)).transpose(0, 1)[None] for x in (q, k, v))
    o = _compiled_flex()(q, k, v, block_mask=mask, scale=scale)
    return o[0].transpose(0, 1)[:t]
