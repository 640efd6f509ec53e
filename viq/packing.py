"""Grouping images into packed batches by token budget (not image count).

A 4K photo and a thumbnail then share batches sanely: each batch holds at most ``budget`` patch
tokens, except an image that alone exceeds the budget, which gets a batch of its own.
"""

from __future__ import annotations

import math


def patch_grid(width: int, height: int, patch: int = 16) -> tuple[int, int]:
    """(h, w) patch grid after padding right/bottom to the patch multiple."""
    return math.ceil(height / patch), math.ceil(width / patch)


def tokens_of(width: int, height: int, patch: int = 16) -> int:
    h, w = patch_grid(width, height, patch)
    return h * w


def token_budget_for_memory(free_bytes: int, width: int, mlp_hidden: int, dtype_bytes: int = 2, slots: int = 4,
                            low: int = 1024, high: int = 131072) -> int:
    """Patch tokens per packed batch whose activations fit ``free_bytes`` during inference.

    A ViT block peaks at about 7 * width + 2 * mlp_hidden values per token (residual, its norm, q/k/v,
    attention output, the MLP's hidden layer before and after GELU); the head's FSQ blocks run each
    patch as ``slots`` rows with a 4 * width MLP: about 13 * width values per row. Half the memory
    is used (allocator slack); the result is a power of two in [low, high].
    """
    per_token = max(7 * width + 2 * mlp_hidden, slots * 13 * width) * dtype_bytes
    fit = max(1, free_bytes // 2 // per_token)
    budget = low
    while budget * 2 <= min(fit, high):
        budget *= 2
    return budget


def batches_by_budget(token_counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose token sum stays within ``budget``; order is kept."""
    if budget <= 0:
        raise ValueError("token budget must be positive")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(token_counts):
        if current and used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches
