"""Typed architecture configuration of a ViQ model.

One object describes everything needed to build the modules (and nothing about how they are run):
it is what a viq weights directory stores in ``config.json`` and what recipes embed under ``model``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from viq.errors import ConfigError

#: FSQ presets: name -> levels (first code dim least significant in the index).
FSQ_PRESETS: dict[str, list[int]] = {
    "2k": [8, 8, 4, 3, 3],
    "4k": [8, 8, 4, 4, 4],
    "8k": [8, 8, 8, 4, 4],
    "16k": [8, 8, 8, 6, 5],
    "64k": [8, 8, 8, 5, 5, 5],
}


def fsq_levels(size_or_levels) -> list[int]:
    """Resolve ``"16k"`` or ``[8, 8, 8, 6, 5]`` to a list of levels."""
    if isinstance(size_or_levels, str):
        if size_or_levels not in FSQ_PRESETS:
            raise ConfigError(f"unknown FSQ size {size_or_levels!r}; choose one of {', '.join(FSQ_PRESETS)}")
        return list(FSQ_PRESETS[size_or_levels])
    levels = [int(v) for v in size_or_levels]
    if not levels or any(v < 2 for v in levels):
        raise ConfigError(f"FSQ levels must be integers >= 2, got {levels}")
    return levels


def fsq_size_name(levels: list[int]) -> Optional[str]:
    for name, lv in FSQ_PRESETS.items():
        if lv == list(levels):
            return name
    return None


def _levels(value) -> list[int]:
    """fsq_levels for a validator: its error as the ValueError pydantic reports under the key."""
    try:
        return fsq_levels(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ViTConfig(_Strict):
    """Any-resolution SigLIP2 ViT (no class token, learned position grid resized per image)."""

    width: PositiveInt = 1536
    depth: PositiveInt = 40
    heads: PositiveInt = 16
    mlp_hidden: PositiveInt = 6144
    patch: PositiveInt = 16
    pos_grid: PositiveInt = 128
    qkv_bias: bool = True
    #: final LayerNorm + attention-pool (MAP) head; used for distillation, never for codes.
    attn_pool: bool = True
    attn_pool_heads: Optional[PositiveInt] = None
    attn_pool_mlp_hidden: Optional[PositiveInt] = None

    @model_validator(mode="after")
    def _check(self):
        if self.width % self.heads:
            raise ValueError(f"vit.width {self.width} is not divisible by vit.heads {self.heads}")
        return self


class RopeConfig(_Strict):
    """Golden-gate 2D RoPE over the 4 slots of each patch."""

    min_freq: float = 0.2
    max_freq: float = 20.0
    p_zero_freqs: float = 0.25
    direction_spacing: float = math.pi * (math.sqrt(5) - 1) / 2


class HeadConfig(_Strict):
    """The ViQ head: pre blocks, expansion into slots, RoPE-2D FSQ blocks, FSQ, inverse path."""

    levels: list[int] = Field(default_factory=lambda: list(FSQ_PRESETS["16k"]))
    slots: PositiveInt = 4
    pre_blocks: NonNegativeInt = 3
    fsq_blocks: NonNegativeInt = 3
    #: width of the FSQ blocks' attention (the reference caps it at 256 = max head dim).
    fsq_attn_dim: PositiveInt = 256
    rope: RopeConfig = Field(default_factory=RopeConfig)
    residual_mlps: NonNegativeInt = 3

    @field_validator("levels", mode="before")
    @classmethod
    def _size_name(cls, v):
        """A preset size such as "16k" becomes its levels (lists are typed by pydantic, checked below)."""
        return _levels(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self):
        _levels(self.levels)
        if self.fsq_attn_dim % 2:
            raise ValueError("head.fsq_attn_dim must be even (RoPE pairs channels)")
        return self

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)


class VAEConfig(_Strict):
    """Keyword arguments of diffusers' ``AutoencoderKLQwenImage`` (defaults = Qwen-Image's VAE)."""

    base_dim: PositiveInt = 96
    z_dim: PositiveInt = 16
    dim_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: NonNegativeInt = 2
    attn_scales: list[float] = Field(default_factory=list)
    temperal_downsample: list[bool] = Field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    latents_mean: Optional[list[float]] = None
    latents_std: Optional[list[float]] = None


class DrawerConfig(_Strict):
    """Codes -> adapter blocks -> latent head (GroupNorm, conv, pixel shuffle) -> VAE decoder."""

    adapter_blocks: NonNegativeInt = 3
    latent_upsample: PositiveInt = 2
    group_norm_groups: PositiveInt = 32
    vae: VAEConfig = Field(default_factory=VAEConfig)


class PixelDecoderConfig(_Strict):
    """Architecture of the pixel decoder (what ``config.json`` stores for it)."""

    #: width of the incoming LLM features (the ViT width, 1536 for the giant model).
    width: PositiveInt = 1536
    adapter_dim: PositiveInt = 768
    adapter_heads: PositiveInt = 12
    adapter_blocks: NonNegativeInt = 2
    adapter_mlp_ratio: float = 4.0
    #: channels at the grid resolution, then after each of the log2(patch) upsampling stages.
    channels: list[int] = Field(default_factory=lambda: [512, 512, 256, 128, 64])
    res_blocks: NonNegativeInt = 2
    mid_blocks: NonNegativeInt = 1
    #: channels of the latent bottleneck (mean/logvar, KL); None = no bottleneck.
    latent_channels: Optional[PositiveInt] = 16
    norm: Literal["channel", "group"] = "channel"
    groups: PositiveInt = 32
    patch: PositiveInt = 16
    #: width of the REPA target features (DINOv2-base: 768); None = no REPA projector.
    repa_dim: Optional[PositiveInt] = None
    repa_hidden: int = 1024

    @model_validator(mode="after")
    def _check(self):
        stages = int(math.log2(self.patch)) if self.patch > 0 else -1
        if self.patch < 1 or 2 ** stages != self.patch:
            raise ValueError(f"patch must be a power of 2, got {self.patch}")
        if len(self.channels) != stages + 1:
            raise ValueError(f"channels needs {stages + 1} entries (grid level + {stages} upsampling stages) "
                             f"for patch {self.patch}, got {len(self.channels)}")
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by groups {self.groups}")
        if self.adapter_dim % self.adapter_heads:
            raise ValueError(f"adapter_dim {self.adapter_dim} is not divisible by adapter_heads {self.adapter_heads}")
        return self

    @property
    def stages(self) -> int:
        return int(math.log2(self.patch))




class ViQConfig(_Strict):
    """A whole ViQ model. ``name`` is informational (preset or run name).

    The one architecture schema: ``config.json`` stores it and a recipe's ``model:`` section is it.
    Input may name a preset under ``arch`` (giant, so400m, tiny) and override any field of it; ``arch``
    is read here and not stored, so a dumped config is complete on its own.
    """

    name: str = "viq"
    vit: ViTConfig = Field(default_factory=ViTConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    drawer: DrawerConfig = Field(default_factory=DrawerConfig)
    #: the lightweight pixel decoder of the decoder stage (None until one is trained).
    pixel_decoder: Optional[PixelDecoderConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if not isinstance(data, dict) or "arch" not in data:
            return data
        over = {k: v for k, v in data.items() if k != "arch"}
        vit = over.get("vit") if isinstance(over.get("vit"), dict) else {}
        # the tiny preset derives MLP, FSQ-attention and GroupNorm widths from these four
        dims = {k: vit[k] for k in ("width", "depth", "heads", "pos_grid") if k in vit} if data["arch"] == "tiny" else {}
        try:
            try:
                base = ARCH_PRESETS[data["arch"]](**dims).model_dump()
            except ValueError:  # a bad dimension: validated below, where the error names its key
                base = ARCH_PRESETS[data["arch"]]().model_dump()
        except KeyError:
            raise ValueError(f"arch: unknown preset {data['arch']!r}; choose one of {', '.join(ARCH_PRESETS)}") from None
        except TypeError:
            raise ValueError(f"arch: a preset name ({', '.join(ARCH_PRESETS)}), got {data['arch']!r}") from None
        return merge_over(base, over)

    @model_validator(mode="after")
    def _check(self):
        if self.vit.width % self.drawer.group_norm_groups:
            raise ValueError(f"drawer.group_norm_groups {self.drawer.group_norm_groups} does not divide vit.width "
                             f"{self.vit.width} (the drawer's GroupNorm runs over the ViT's channels)")
        return self

    @property
    def width(self) -> int:
        return self.vit.width

    def with_levels(self, levels) -> "ViQConfig":
        cfg = self.model_copy(deep=True)
        cfg.head.levels = fsq_levels(levels)
        return cfg


def merge_over(base, over):
    """``over`` on top of ``base``: mappings merge key by key; anything else (lists, scalars, null) replaces."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: merge_over(base[k], v) if k in base else v for k, v in over.items()}}


def giant_config(size: str = "16k") -> ViQConfig:
    """The released SigLIP2 giant-opt g/16 ViQ (1536 wide, 40 deep)."""
    return ViQConfig(name=f"viq-giant-{size}", head=HeadConfig(levels=fsq_levels(size)))


def so400m_config(size: str = "16k") -> ViQConfig:
    """SigLIP2 so400m/16 (1152 wide, 27 deep, MLP 4304)."""
    return ViQConfig(
        name=f"viq-so400m-{size}",
        vit=ViTConfig(width=1152, depth=27, heads=16, mlp_hidden=4304),
        head=HeadConfig(levels=fsq_levels(size)),
    )


def tiny_config(size: str = "16k", width: int = 64, depth: int = 2, heads: int = 4,
                pos_grid: int = 16, vae_base_dim: int = 8) -> ViQConfig:
    """A tiny model for tests and CPU demos (same structure, small dimensions)."""
    return ViQConfig(
        name=f"viq-tiny-{size}",
        vit=ViTConfig(width=width, depth=depth, heads=heads, mlp_hidden=4 * width, pos_grid=pos_grid),
        head=HeadConfig(levels=fsq_levels(size), fsq_attn_dim=min(64, width)),
        drawer=DrawerConfig(group_norm_groups=min(32, width // 2),
                            vae=VAEConfig(base_dim=vae_base_dim, num_res_blocks=1)),
    )


ARCH_PRESETS = {"giant": giant_config, "so400m": so400m_config, "tiny": tiny_config}


def preset_config(arch: str, size: str = "16k") -> ViQConfig:
    if arch not in ARCH_PRESETS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_PRESETS)}")
    return ARCH_PRESETS[arch](size)
