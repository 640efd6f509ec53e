"""AdamW (or plain SGD) with the right parameters left undecayed, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


_NO_DECAY_NAMES = ("pos_embed", "attn_pool.latent", "image_newline", "image_begin", "image_end", "post_scale",
                   "post_shift", "codebook")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices; none for biases, norms and vector parameters.

    Unlike the reference (§7.23) the position grid, the MAP latent, the LayerNorm-trick scale and
    the projector's special vectors are not decayed either.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, norm_types) or type(module).__name__.endswith("RMSNorm"):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or id(p) in no_decay_ids or name.endswith(".bias") or any(s in name for s in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(groups: list[dict], optim) -> torch.optim.Optimizer:
    """``optim.name``: adamw (training), or sgd (plain, no momentum: what the equivalence tests compare)."""
    if not groups or not any(g["params"] for g in groups):
        from viq.errors import ConfigError

        raise ConfigError("nothing to train: no parameter requires gradients")
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.lr_factor(s, total_steps))


def total_steps(optim, steps_per_epoch: int) -> int:
    if optim.max_steps is not None:
        return int(optim.max_steps)
    return max(1, math.floor(optim.epochs * steps_per_epoch / optim.grad_accum))
