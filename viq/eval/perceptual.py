"""Perceptual networks: LPIPS (VGG16) and DINOv2 patch features, loaded from local files only.

LPIPS (Zhang et al. 2018, "lin" v0.1 over VGG16). Built here in code:
  input in [-1, 1] -> (x - shift) / scale -> VGG16 conv stack, taps after relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3 -> unit-normalise over channels -> squared difference -> 1x1 conv without bias
  (the learned "lin" layer, non-negative weights) -> mean over space -> sum over the 5 taps.

Weights file layout (``load_lpips``): one file or a directory of files (``.safetensors``, or a
weights-only ``.pth``/``.pt``), merged, holding
  * the VGG16 convs in torchvision's names ``features.{i}.weight|bias`` for i in
    0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (torchvision's ``vgg16-397923af.pth``; its
    ``classifier.*`` keys are ignored), or the lpips package's names ``net.slice{n}.{i}.weight|bias``;
  * the five lin layers as ``lin{k}.model.1.weight`` (k = 0..4, shape (1, C_k, 1, 1): the lpips
    package's ``weights/v0.1/vgg.pth``), or viq's own ``lins.{k}.weight``.
viq's own layout (what ``LPIPS.state_dict()`` holds) is ``vgg.{i}.*`` and ``lins.{k}.weight``.

DINOv2 through transformers' ``Dinov2Model``: ``load_dinov2(path)`` reads a local Hugging Face
directory (``config.json`` + weights, e.g. facebook/dinov2-base) with ``local_files_only=True``;
``load_dinov2(tiny=True)`` builds a small random stand-in from a ``Dinov2Config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.errors import ConfigError, KeyMismatchError, WeightsError
from viq.weights.io import read_tensors

#: the folder under the models directory where LPIPS weights are looked for by default.
LPIPS_DOWNLOAD_NAME = "lpips-vgg16"
#: where the two LPIPS files come from (neither is on the Hugging Face hub, so `viqctl download` cannot fetch them).
LPIPS_HOWTO = ("put torchvision's vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth "
               "(pip install lpips) in one folder, e.g. <models>/lpips-vgg16")
DINOV2_DOWNLOAD_NAME = "dinov2-base"

#: VGG16 "features" indices: conv layers, and the ReLU after which each LPIPS tap is taken.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_WIDTHS = (64, 128, 256, 512, 512)
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _vgg_stack(widths: tuple[int, ...]) -> nn.Sequential:
    """VGG16's conv part up to relu5_3, with torchvision's layer indices; widths per block."""
    layers: list[nn.Module] = []
    cin, block = 3, 0
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            block += 1
            continue
        cout = widths[block]
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
        cin = cout
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Learned perceptual distance; ``forward(x, y)`` on (B, 3, H, W) in [-1, 1] -> (B,)."""

    def __init__(self, widths: tuple[int, ...] = _VGG16_WIDTHS):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = _vgg_stack(tuple(widths))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps, start = [], 0
        for end in _VGG16_TAPS:
            for layer in self.vgg[start:end + 1]:
                x = layer(x)
            taps.append(x)
            start = end + 1
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ConfigError(f"LPIPS needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        dtype = self.lins[0].weight.dtype
        fx, fy = self.features(x.to(dtype)), self.features(y.to(dtype))
        total = 0
        for a, b, lin in zip(fx, fy, self.lins):
            d = (_unit(a) - _unit(b)) ** 2
            total = total + lin(d).mean(dim=(2, 3))
        return total[:, 0]


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def tiny_lpips(seed: int = 0) -> LPIPS:
    """A small random LPIPS for tests: the same structure, narrow layers, non-negative lin weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LPIPS(widths=(4, 8, 8, 16, 16))
    with torch.no_grad():
        for lin in net.lins:
            lin.weight.abs_()
    return net


def lpips_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Foreign LPIPS/VGG16 key names -> viq's (see the module docstring); unknown keys are kept as they are."""
    out = {}
    for key, val in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        parts = k.split(".")
        if k.startswith(("classifier.", "scaling_layer.")):
            continue  # VGG16's fully connected head is unused; the scaling constants are built in
        if parts[0] == "features" and len(parts) == 3:
            k = f"vgg.{parts[1]}.{parts[2]}"
        elif parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
            k = f"vgg.{parts[2]}.{parts[3]}"
        elif parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[1:] == ["model", "1", "weight"]:
            k = f"lins.{parts[0][3:]}.weight"
        elif parts[0] == "lins" and parts[2:] == ["model", "1", "weight"]:  # lpips' duplicate names
            k = f"lins.{parts[1]}.weight"
        out[k] = val
    return out


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def load_lpips(path: Optional[str | os.PathLike] = None, tiny: bool = False, device=None) -> LPIPS:
    """LPIPS with weights from a local file or directory (layout in the module docstring), or ``tiny=True``."""
    if tiny:
        net = tiny_lpips()
        return net.to(device) if device is not None else net
    if path is None:
        raise WeightsError(f"LPIPS needs its weights (VGG16 + lin layers): {LPIPS_HOWTO}, and pass that path")
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: LPIPS weights not found; {LPIPS_HOWTO}")
    files = _weight_files(path)
    if not files:
        raise WeightsError(f"{path}: no .safetensors/.pth weights inside; {LPIPS_HOWTO}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(lpips_key_map(read_tensors(f)))
    net = LPIPS()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        err = KeyMismatchError(f"LPIPS weights {path}", missing, unexpected, mismatched)
        hint = ""
        if any(k.startswith("lins.") for k in missing):
            hint = " (the lin layers are missing: add the lpips v0.1 vgg.pth)"
        elif any(k.startswith("vgg.") for k in missing):
            hint = " (the VGG16 convs are missing: add torchvision's vgg16 weights)"
        raise WeightsError(f"{err}{hint}; {LPIPS_HOWTO}") from None
    net.load_state_dict({k: state[k].float() for k in expected})
    return net.to(device) if device is not None else net


# ---- DINOv2 -----------------------------------------------------------------------------------------
class DinoFeatures(nn.Module):
    """Frozen DINOv2 patch features on a given grid, for REPA.

    ``forward(images, grid)``: images (B, 3, H, W) in [-1, 1] are resized (bicubic, antialiased) to
    (p*h, p*w) with p the DINOv2 patch (14), so DINOv2's own patch grid is exactly (h, w) -- the
    decoder's grid; ImageNet mean/std normalisation; returns the final-norm patch tokens as
    (B, C, h, w) (the CLS token and any registers are dropped).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def patch(self) -> int:
        return int(self.model.config.patch_size)

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        p = self.patch
        dtype = next(self.model.parameters()).dtype
        x = F.interpolate(images.float(), size=(h * p, w * p), mode="bicubic", align_corners=False, antialias=True)
        x = ((x * 0.5 + 0.5) - self.mean) / self.std
        out = self.model(pixel_values=x.to(dtype)).last_hidden_state
        tokens = out[:, -h * w:]  # patch tokens come last (after CLS and registers)
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w).float()


def load_dinov2(path: Optional[str | os.PathLike] = None, tiny: bool = False, device=None,
                dtype: torch.dtype = torch.float32) -> DinoFeatures:
    """DINOv2 from a local Hugging Face directory (never the network), or a tiny random one for tests."""
    from transformers import Dinov2Config, Dinov2Model

    if tiny:
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           patch_size=14, image_size=28)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = DinoFeatures(Dinov2Model(cfg))
        return net.to(device) if device is not None else net
    if path is None:
        raise WeightsError(f"REPA needs DINOv2 weights; get them with `viqctl download {DINOV2_DOWNLOAD_NAME}` "
                           "and pass the directory")
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path}: no DINOv2 config.json there; get the weights with "
                           f"`viqctl download {DINOV2_DOWNLOAD_NAME}`")
    try:
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as exc:  # transformers raises OSError/ValueError for missing or bad files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: cannot load DINOv2 ({reason}); get the weights with "
                           f"`viqctl download {DINOV2_DOWNLOAD_NAME}`") from None
    net = DinoFeatures(model)
    return net.to(device) if device is not None else net
