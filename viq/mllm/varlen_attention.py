"""Causal attention within the samples of a packed row, for transformers' Qwen2 without flash-attn.

A packed row holds several samples back to back (``cu_seq_lens_q`` marks where each starts). SDPA
with a block-diagonal mask does O(L^2) work over the whole row; looping over the samples does
O(sum l_i^2) but pays one small call (and its backward) per sample. Here samples of similar length
(within 2x) are gathered into one padded batch and attended in a single SDPA call with a causal,
length-aware mask: O(sum l_i^2) up to a factor of 4, in a handful of calls.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: ``attn_implementation`` name of ``varlen_sdpa_attention`` (after ``register_varlen_sdpa()``).
VARLEN_SDPA = "viq_varlen_sdpa"


def cu_seqlens(segments, device) -> torch.Tensor:
    """Cumulative sample boundaries [0, l_0, l_0 + l_1, ...] as int32 (flash-attn's ``cu_seqlens``)."""
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def length_buckets(lengths: list[int], ratio: float = 2.0) -> list[list[int]]:
    """Sample indices grouped so that within a group the longest is at most ``ratio`` x the shortest."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= ratio * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def varlen_sdpa_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D), causal within each sample."""
    if query.shape[0] != 1:
        raise ValueError("varlen SDPA takes packed rows flattened to batch size 1")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    L = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    bounds = [0, L] if cu is None else [int(v) for v in cu.tolist()]
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    p = dropout if module.training else 0.0
    q, k, v = query[0], key[0], value[0]  # (H, L, D)
    pieces, positions = [], []
    for group in length_buckets(lengths):
        m = lengths[group[0]]
        start = torch.tensor([starts[i] for i in group], device=q.device)
        length = torch.tensor([lengths[i] for i in group], device=q.device)
        ar = torch.arange(m, device=q.device)
        valid = ar[None, :] < length[:, None]  # (B, m)
        idx = torch.where(valid, start[:, None] + ar[None, :], 0)
        qb, kb, vb = (t[:, idx].transpose(0, 1) for t in (q, k, v))  # (B, H, m, D)
        causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]  # padded keys never attended
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=p, scale=scaling)
        pieces.append(out.transpose(1, 2)[valid])  # (n_valid, H, D), sample by sample
        positions.append(idx[valid])
    order = torch.cat(positions).argsort()
    return torch.cat(pieces)[order][None], None


def register_varlen_sdpa() -> str:
    """Make ``attn_implementation=VARLEN_SDPA`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    # no mask: the samples are kept apart here (else transformers builds the L x L mask it never reads)
    AttentionMaskInterface.register(VARLEN_SDPA, _no_mask)
    return VARLEN_SDPA


def _no_mask(*args, **kwargs):
    return None
