"""The trainable tokenizer: the inference ``ViQModel`` plus the parts only training needs.

Inference only ever sees FSQ indices; training also needs the continuous path: features that carry
gradients through the straight-through quantizer, the quantizer's auxiliary loss, the pooled feature
distilled towards the teacher, and the drawer's predicted latents. The student's inference part is
``ViQModel``'s module tree (``vit.*``, ``head.*``, ``drawer.*``), so export is its ``state_dict()``;
a non-FSQ quantizer adds a training-only ``bottleneck`` (and ``quantizer.*`` for SimVQ) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.config import ViQConfig, ViTConfig
from viq.errors import ConfigError
from viq.model.drawer import Drawer
from viq.model.head import ViQHead
from viq.model.viq_model import ALL_PARTS, ViQModel
from viq.nn.vit import AnyResViT, Packing
from viq.quant import FSQQuantizer


@dataclass
class StudentOutput:
    tokens: torch.Tensor  # (T, C) last ViT block, packed
    features: torch.Tensor  # (T, C) what the LLM projector reads (head output, or tokens without a head)
    packing: Packing
    indices: Optional[torch.Tensor]  # (slots * T,) int64, or None (no head / pass-through)
    aux_loss: torch.Tensor  # quantizer's auxiliary loss (0 for fsq and pass-through)
    feat_rec: Optional[torch.Tensor]  # MSE(sg LN(tokens), head output before its affine)
    pooled: Optional[torch.Tensor]  # (B, C) MAP feature per image
    latents: Optional[list[torch.Tensor]]  # per image (1, z, 2h, 2w)


def new_vit(cfg: ViTConfig, with_pool: bool, seed: int) -> AnyResViT:
    """A randomly initialised ViT, the same for a seed whatever was built before it.

    PyTorch's default init as the reference, except the learned position grid and the MAP latent,
    which start at zero there (only sensible when loading weights): small normals instead.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = AnyResViT(cfg, with_pool=with_pool)
        nn.init.normal_(vit.pos_embed, std=0.02)
        if vit.with_pool:
            nn.init.normal_(vit.attn_pool.latent, std=cfg.width ** -0.5)
    return vit


class Bottleneck(nn.Module):
    """Training-only projections around a non-FSQ quantizer (the stage 2-1 proximal bottleneck, SimVQ).

    Its width is the quantizer's, not the FSQ levels' count; inference never sees it."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.project_in = nn.Linear(width, dim)
        self.project_out = nn.Linear(dim, width)


class Student(ViQModel):
    """The inference ``ViQModel`` (ViT + pool, head, drawer) plus training-only parts.

    Training-only: ``quantizer`` (straight-through, with its auxiliary loss) and, for a non-FSQ
    quantizer, ``bottleneck`` (its own projections; the head's FSQ projections and code table then
    sit idle, frozen and out of checkpoints). Without a head (stage 1) the student is the ViT alone.
    """

    def __init__(self, cfg: ViQConfig, quantizer: Optional[nn.Module] = None, *, head: bool = True,
                 pool: bool = True, drawer: bool = False, seed: int = 0):
        nn.Module.__init__(self)  # the parts are built here, each from its own seed
        if drawer and not head:
            raise ConfigError("the drawer reads the head's output: a student without a head has no drawer")
        pool = pool and cfg.vit.attn_pool
        self.cfg = cfg
        wanted = {"encoder": head, "decoder": head, "pool": pool, "drawer": drawer}
        self.parts = tuple(p for p in ALL_PARTS if wanted.get(p, False))
        self.vit = new_vit(cfg.vit, pool, seed)
        self.head = self.quantizer = self.bottleneck = self.drawer = None
        if head:
            quantizer = quantizer if quantizer is not None else FSQQuantizer(cfg.head.levels)
            if quantizer.kind == "fsq" and list(quantizer.fsq.levels_list) != list(cfg.head.levels):
                raise ConfigError(f"FSQ levels {quantizer.fsq.levels_list} differ from the config's "
                                  f"{cfg.head.levels}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.head = ViQHead(cfg.vit.width, cfg.vit.heads, cfg.head)
                if quantizer.kind != "fsq":
                    self.bottleneck = Bottleneck(cfg.vit.width, quantizer.dim)
            self.quantizer = quantizer
        if drawer:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 2)
                self.drawer = Drawer(cfg.vit.width, cfg.vit.heads, cfg.drawer)
            self.drawer.vae.requires_grad_(False)
        if self.bottleneck is not None:
            for name in ("project_in", "project_out"):
                getattr(self.head, name).requires_grad_(False)

    # ---- properties -------------------------------------------------------------------------
    @property
    def kind(self) -> Optional[str]:
        return None if self.quantizer is None else self.quantizer.kind

    @property
    def codebook_size(self) -> Optional[int]:
        return None if self.quantizer is None else self.quantizer.codebook_size

    @property
    def has_pool(self) -> bool:
        return self.vit.with_pool

    @property
    def idle_keys(self) -> tuple[str, ...]:
        """Inference tensors this student never uses (a bottleneck replaces them): not trained, not saved."""
        if self.bottleneck is None:
            return ()
        return ("head.project_in.weight", "head.project_in.bias", "head.project_out.weight",
                "head.project_out.bias", "head.codebook")

    def set_grad_checkpointing(self, on: bool) -> None:
        self.vit.grad_checkpointing = on
        if self.head is not None:
            self.head.grad_checkpointing = on

    def train(self, mode: bool = True):
        super().train(mode)
        if self.drawer is not None:
            self.drawer.vae.eval()  # frozen; never in train mode
        return self

    # ---- forward ------------------------------------------------------------------------------
    def decode_pre_affine(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (slots * T, d) -> head output before the LayerNorm-trick affine (T, C)."""
        h = self.head
        project_out = h.project_out if self.bottleneck is None else self.bottleneck.project_out
        x = project_out(codes.to(project_out.weight.dtype))
        x = h.merge_slots(x.reshape(-1, h.slots * h.width))
        for mlp in h.post_mlps:
            x = mlp(x)
        return x

    def forward(self, images: list[torch.Tensor], *, pool_from: Optional[str] = None, draw: bool = False,
                feat_rec: bool = False, vit_grad: bool = True) -> StudentOutput:
        """Images (3, H, W) in [-1, 1]. ``pool_from``: None, "head" or "vit"; ``draw``: predict latents."""
        if vit_grad:
            tokens, packing = self.vit(images)
        else:
            with torch.no_grad():
                tokens, packing = self.vit(images)
        indices, rec = None, None
        aux = tokens.new_zeros((), dtype=torch.float32)
        features = tokens
        if self.head is not None:
            project_in = self.head.project_in if self.bottleneck is None else self.bottleneck.project_in
            z = project_in(self.head.slot_features(tokens, packing))
            # Quantization math in float32 whatever the autocast dtype (bf16 cannot hold the levels).
            with torch.autocast(device_type=z.device.type, enabled=False):
                q = self.quantizer(z.float())
            indices, aux = q.indices, q.aux_loss
            pre = self.decode_pre_affine(q.codes)
            features = pre * self.head.post_scale + self.head.post_shift
            if feat_rec:
                rec = F.mse_loss(pre.float(), self.head.pre_norm(tokens).detach().float())
        pooled = None
        if pool_from is not None:
            if not self.has_pool:
                raise ConfigError("this student was built without the attention-pool head")
            src = features if pool_from == "head" else tokens
            pooled = torch.stack([self.vit.pool(x) for x in packing.split(src)])
        latents = None
        if draw:
            if self.drawer is None:
                raise ConfigError("this student was built without a drawer")
            latents = self.drawer.latents(features, packing)
        return StudentOutput(tokens, features, packing, indices, aux, rec, pooled, latents)

    # ---- freezing -----------------------------------------------------------------------------
    def set_trainable(self, *, vit: bool = True, vit_mlp_norm: bool = True, pool: bool = True,
                      head: bool = True, head_pre_blocks: bool = True, drawer: bool = True) -> None:
        """Which parts train. The VAE inside the drawer is always frozen."""
        self.requires_grad_(False)
        v = self.vit
        for name, p in v.named_parameters():
            if name.startswith(("norm.", "attn_pool.")):
                p.requires_grad_(pool)
            elif vit and not vit_mlp_norm and name.startswith("blocks.") and (".mlp." in name or ".norm" in name):
                p.requires_grad_(False)
            else:
                p.requires_grad_(vit)
        if self.head is not None:
            self.head.requires_grad_(head)
            if head and not head_pre_blocks:
                self.head.pre_blocks.requires_grad_(False)
            self.quantizer.requires_grad_(head)
            if self.bottleneck is not None:
                self.bottleneck.requires_grad_(head)
                for name in ("project_in", "project_out"):
                    getattr(self.head, name).requires_grad_(False)  # idle: the bottleneck stands in
        if self.drawer is not None:
            self.drawer.requires_grad_(drawer)
            self.drawer.vae.requires_grad_(False)

    # ---- export -------------------------------------------------------------------------------
    def viq_parts(self) -> tuple[str, ...]:
        return self.parts

    def inference_state(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` of the inference part: everything but the training-only modules."""
        training_only = ("quantizer.", "bottleneck.")
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith(training_only)}

    def viq_state(self) -> dict[str, torch.Tensor]:
        """The weights in viq's inference names (``save_viq``'s input); FSQ students only."""
        if self.kind != "fsq":
            raise ConfigError(f"only an FSQ student exports to viq's weights format (this one is {self.kind!r}); "
                              "continue with the FSQ stage (2-2) to get codes")
        state = self.inference_state()
        with torch.device("meta"):
            expected = ViQModel(self.cfg, self.parts).state_dict()
        if set(state) != set(expected):  # the student's inference part is ViQModel's module tree by construction
            odd = sorted(set(state) ^ set(expected))
            raise ConfigError(f"the student's inference part differs from ViQModel's in {len(odd)} tensors, "
                              f"e.g. {odd[0]}")
        return state
