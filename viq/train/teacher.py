"""The frozen fixed-resolution teacher, and SigLIP2 open_clip/timm weights loaded into our ViT.

The teacher sees every image bilinearly resized (aspect not kept) to ``resolution`` x
``resolution`` and returns its MAP attention-pool feature: the SigLIP2 image embedding before any
projection (reference-training.md §2.7). It keeps its checkpoint's native position grid (24x24 for
SigLIP2 at 384), so at its own resolution no position resampling happens.

Note: timm's SigLIP2 uses the tanh GELU, our blocks the exact one (as ViQ's ViT); the teacher's
feature therefore differs slightly from open_clip's. It is a fixed target either way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.config import ViTConfig
from viq.errors import WeightsError
from viq.model.student import new_vit
from viq.nn.vit import AnyResViT
from viq.weights.io import read_tensors

OPENCLIP_PREFIX = "visual.trunk."
#: timm trunk tensors that are identities for SigLIP2 (no params) or that our ViT does not hold.
_IGNORED = ("fc_norm.", "head.", "attn_pool.q_norm.", "attn_pool.k_norm.")


def trunk_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip (``visual.trunk.*``) or bare timm keys -> the trunk's own names."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in tensors):
        return {k[len(OPENCLIP_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPENCLIP_PREFIX)}
    if "pos_embed" in tensors and any(k.startswith("blocks.") for k in tensors):
        return dict(tensors)
    raise WeightsError("not a SigLIP2 open_clip/timm checkpoint (no visual.trunk.* or pos_embed/blocks.* keys)")


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g0*g0, C) -> (1, grid*grid, C), bicubic (the reference's 24 -> 128 at load)."""
    n, c = pos.shape[1], pos.shape[2]
    g0 = math.isqrt(n)
    if g0 * g0 != n:
        raise WeightsError(f"pos_embed holds {n} positions, not a square grid")
    if g0 == grid:
        return pos
    x = pos.float().reshape(1, g0, g0, c).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)


def trunk_to_vit(trunk: dict[str, torch.Tensor], cfg: ViTConfig, with_pool: bool) -> tuple[dict, list[str]]:
    """Trunk tensors -> AnyResViT state (position grid and patch kernel adapted); and notes."""
    notes = []
    out = {}
    for k, v in trunk.items():
        if k.startswith(_IGNORED):
            continue
        if not with_pool and k.startswith(("norm.", "attn_pool.")):
            continue
        out[k] = v
    if "pos_embed" in out:
        g0 = math.isqrt(out["pos_embed"].shape[1])
        if g0 != cfg.pos_grid:
            out["pos_embed"] = resize_pos_embed(out["pos_embed"], cfg.pos_grid)
            notes.append(f"pos_embed {g0}x{g0} -> {cfg.pos_grid}x{cfg.pos_grid} (bicubic)")
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.shape[-1] != cfg.patch:
        out["patch_embed.proj.weight"] = F.interpolate(w.float(), size=(cfg.patch, cfg.patch), mode="bicubic",
                                                       align_corners=False).to(w.dtype)
        notes.append(f"patch kernel {w.shape[-1]} -> {cfg.patch} (bicubic)")
    if "attn_pool.latent" in out and out["attn_pool.latent"].shape[1] != 1:
        raise WeightsError("the checkpoint's MAP head has several latents; ViQ's has one")
    return out, notes


def load_siglip2_openclip(path, vit: AnyResViT) -> list[str]:
    """Fill ``vit`` from an open_clip/timm SigLIP2 checkpoint, strictly; returns what was adapted."""
    state, notes = trunk_to_vit(trunk_tensors(read_tensors(path)), vit.cfg, vit.with_pool)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(f"{path}: does not fit the ViT (width {vit.cfg.width}, depth {vit.cfg.depth}): "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
    vit.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return notes


class Teacher(nn.Module):
    """Frozen ViT + MAP head at a fixed square resolution. ``forward(images) -> (B, C)``."""

    def __init__(self, vit: AnyResViT, resolution: int):
        super().__init__()
        if not vit.with_pool:
            raise WeightsError("the teacher needs its attention-pool (MAP) head")
        self.vit, self.resolution = vit, resolution
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One image at a time (each result independent of its batch: exact resumes on CPU)."""
        dtype = self.vit.pos_embed.dtype
        out = []
        for img in images:
            x = F.interpolate(img[None].float(), size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False)[0].to(dtype)
            tokens, _ = self.vit([x])
            out.append(self.vit.pool(tokens))
        return torch.stack(out).float()


def build_teacher(section, student_vit: ViTConfig, arch_vit: Optional[ViTConfig] = None, seed: int = 0) -> Teacher:
    """The recipe's ``teacher`` section -> a frozen Teacher.

    ``ckpt`` null: a random ViT of the student's architecture built exactly as the student's own
    from-scratch ViT (same seed), i.e. a frozen copy of its initial weights: a download-free stand-in
    for tests and tiny runs. Otherwise the open_clip SigLIP2 checkpoint, at its native position grid.
    """
    cfg = arch_vit or student_vit
    if section.kind != "siglip2":
        raise WeightsError(f"teacher.kind {section.kind!r} is not implemented yet; use siglip2")
    if section.ckpt is None:
        return Teacher(new_vit(student_vit, True, seed), section.input_resolution)
    trunk = trunk_tensors(read_tensors(section.ckpt))
    if "pos_embed" not in trunk:
        raise WeightsError(f"{section.ckpt}: no pos_embed in the trunk")
    grid = math.isqrt(trunk["pos_embed"].shape[1])
    cfg = cfg.model_copy(update={"pos_grid": grid, "attn_pool": True})
    with torch.device("meta"):
        vit = AnyResViT(cfg, with_pool=True)
    state, _ = trunk_to_vit(trunk, cfg, True)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or wrong:
        raise WeightsError(f"{section.ckpt}: the teacher checkpoint does not fit the {cfg.width}-wide, "
                           f"{cfg.depth}-deep ViT (set teacher.arch): missing {missing[:5]}, shape mismatch {wrong[:5]}")
    vit.load_state_dict({k: state[k].float() for k in own}, assign=True)
    return Teacher(vit, section.input_resolution)
