"""The decoder stage's parts: its image data set and the nets its losses use (LPIPS, DINOv2).

* Data: every image of the data JSONL (``data.path``), resized as the sample (or data.default_resize)
  says, in [-1, 1], zero-padded (mid grey, as the ViT pads) right/bottom to the patch multiple.
* Perceptual nets, from local files only:
    - LPIPS: ``paths.lpips`` when set (``tiny`` = a random stand-in, tests), else
      ``${paths.models}/lpips-vgg16`` (``viq.eval.perceptual.LPIPS_HOWTO`` says what goes there);
    - DINOv2 (REPA): ``decoder.repa.encoder`` (a Hugging Face directory; ``tiny`` = a random stand-in).
* Pixel decoder architecture: ``model.pixel_decoder`` (None = PixelDecoderConfig's defaults). ``width``
  follows the tokenizer's feature width and ``repa_dim`` the DINOv2 width unless given explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from viq.config import PixelDecoderConfig
from viq.errors import ConfigError, ViQError, WeightsError
from viq.images import to_pixels

TINY = "tiny"


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    index: int  # position in the image list
    source: str
    pixels: Optional[torch.Tensor]  # (3, H', W') padded to the patch multiple, in [-1, 1]
    size: tuple[int, int]  # (H, W) before padding
    error: str = ""


class ImageDataset(torch.utils.data.Dataset):
    """Every image of the samples, resized as the sample (or the default) says, padded to the patch grid."""

    def __init__(self, samples, default_resize, patch: int):
        self.refs = [ref for s in samples for ref in s.images]
        self.default_resize, self.patch = default_resize, patch

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> ImageItem:
        from viq.mllm.collate import _read_image
        from viq.images import DEFAULT_MAX_PIXELS

        ref = self.refs[i]
        try:
            img = _read_image(ref, DEFAULT_MAX_PIXELS)
            size = (ref.resize or self.default_resize).target_size(*img.size)
            if size != img.size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            x = to_pixels(img)
        except (ViQError, OSError, ValueError) as exc:
            return ImageItem(i, ref.source, None, (0, 0), str(exc))
        p = self.patch
        h, w = x.shape[1:]
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return ImageItem(i, ref.source, x, (h, w))


def _as_list(items):
    return list(items)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


# ---- nets -------------------------------------------------------------------------------------------


def load_perceptual(recipe, device):
    """(lpips net or None, dino net or None, notes) as the recipe asks (see the module docstring)."""
    from viq.eval.perceptual import LPIPS_DOWNLOAD_NAME, LPIPS_HOWTO, load_dinov2, load_lpips

    d, notes = recipe.decoder, {}
    lpips = dino = None
    if d.lpips.enabled:
        path = recipe.paths.get("lpips")
        if path is None and recipe.paths.get("models"):
            path = str(Path(recipe.paths["models"]).expanduser() / LPIPS_DOWNLOAD_NAME)
        if path is None:
            raise ConfigError("decoder.lpips is on but no LPIPS weights are named: set paths.lpips (a file or "
                              f"directory: {LPIPS_HOWTO}) or paths.models, or paths.lpips: tiny for a random "
                              "stand-in (tests)")
        lpips = load_lpips(tiny=True) if path == TINY else load_lpips(path)
        notes["lpips"] = path
    if d.repa.enabled:
        enc = d.repa.encoder
        dino = load_dinov2(tiny=True) if enc == TINY else load_dinov2(enc)
        notes["repa_encoder"] = enc
    for net in (lpips, dino):
        if net is not None:
            net.to(device).eval().requires_grad_(False)
    return lpips, dino, notes


def pixel_config(recipe, width: int, patch: int, dino) -> PixelDecoderConfig:
    given = recipe.model.pixel_decoder
    data = given.model_dump() if given is not None else PixelDecoderConfig().model_dump()
    fields_set = given.model_fields_set if given is not None else set()
    if "width" not in fields_set:
        data["width"] = width
    if "repa_dim" not in fields_set and dino is not None:
        data["repa_dim"] = dino.dim
    cfg = PixelDecoderConfig(**data)
    if cfg.width != width:
        raise ConfigError(f"model.pixel_decoder.width {cfg.width} differs from the tokenizer's feature width {width}")
    if cfg.patch != patch:
        raise ConfigError(f"model.pixel_decoder.patch {cfg.patch} differs from the tokenizer's patch {patch}")
    if dino is not None and cfg.repa_dim != dino.dim:
        raise ConfigError(f"model.pixel_decoder.repa_dim {cfg.repa_dim} differs from the REPA encoder's width {dino.dim}")
    return cfg


def source_parts(path: Path) -> tuple[str, ...]:
    """The parts of the starting viq directory the output must carry (encoder and decoder at least)."""
    parts = ("encoder", "decoder", "drawer")
    try:
        meta = json.loads((path / "config.json").read_text())
        have = set(meta.get("parts") or {})
        if have:
            parts = tuple(p for p in ("encoder", "pool", "decoder", "drawer") if p in have)
    except (OSError, ValueError):
        pass
    missing = [p for p in ("encoder", "decoder") if p not in parts]
    if missing:
        raise WeightsError(f"{path}: the decoder stage needs a viq directory with the parts {missing}")
    return parts
