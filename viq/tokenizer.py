"""The public Python API: ``load_tokenizer(...)`` -> ``ViQTokenizer`` with encode / embed / reconstruct.

Codes of one image are an integer grid (h, w, 4): ``codes[r, c, j]`` is slot j of patch (r, c), i.e.
position 4 * (r * w + c) + j of the reference's flat index list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from viq.config import ViQConfig
from viq.errors import ConfigError
from viq.model.viq_model import ALL_PARTS, ViQModel
from viq.nn.vit import Packing

DEMO_MODEL = Path(__file__).parent / "assets" / "demo-model"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device=None) -> str:
    """A device this machine has, or a ConfigError saying why not (rather than a CUDA assertion later)."""
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported")
    return str(dev)


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """Default: float32 on CPU, bfloat16 on CUDA."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    return names[dtype]


class ViQTokenizer:
    """A loaded ViQ model plus the glue between images, codes, features and pixels."""

    def __init__(self, model: ViQModel, config: ViQConfig, report=None, source: str | None = None):
        self.model = model
        self.config = config
        self.report = report
        self.source = source

    # ---- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def levels(self) -> list[int]:
        return list(self.config.head.levels)

    @property
    def codebook_size(self) -> int:
        return self.config.head.codebook_size

    @property
    def patch(self) -> int:
        return self.config.vit.patch

    def identity(self) -> dict:
        """What a code store records so that only a matching model decodes its codes."""
        fps = self.report.fingerprints if self.report else {}
        return {"name": self.config.name, "source": self.source, "levels": self.levels,
                "codebook_size": self.codebook_size, "decoder_fingerprint": fps.get("decoder"),
                "encoder_fingerprint": fps.get("encoder"), "config": self.config.model_dump(mode="json")}

    # ---- images -> codes ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed images (3, H, W) in [-1, 1], packed into one sequence -> codes (h, w, 4) int64."""
        if not pixels:
            return []
        # pinned tensors (the encode pipeline pins on CUDA) copy asynchronously; cast on the device
        images = [p.to(self.device, non_blocking=True).to(self.dtype) for p in pixels]
        indices, packing = self.model.encode(images)
        indices = indices.cpu()  # one copy for the batch, not one (and one wait for the GPU) per image
        return [idx.reshape(h, w, self.config.head.slots)
                for idx, (h, w) in zip(packing.split(indices, self.config.head.slots), packing.grids)]

    def encode(self, images: Iterable, policy="native") -> list[torch.Tensor]:
        """PIL images, file paths or pixel tensors -> codes (h, w, 4) per image (one packed batch)."""
        from viq.images import load_rgb, parse_policy, to_pixels, to_rgb

        pol = parse_policy(policy) if isinstance(policy, str) else policy
        pixels = []
        for im in images:
            if isinstance(im, torch.Tensor):
                pixels.append(im)
                continue
            if isinstance(im, (str, Path)):
                im = load_rgb(im)
            pixels.append(to_pixels(pol.apply(to_rgb(im))))
        return self.encode_pixels(pixels)

    # ---- codes -> features / pixels -------------------------------------------------------------
    def _pack_codes(self, codes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Packing]:
        grids, flat = [], []
        for c in codes:
            c = torch.as_tensor(c)
            if c.ndim != 3 or c.shape[-1] != self.config.head.slots:
                raise ConfigError(f"codes must have shape (h, w, {self.config.head.slots}), got {tuple(c.shape)}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
                raise ConfigError(f"codes out of range [0, {self.codebook_size}) for FSQ levels {self.levels}")
            grids.append((int(c.shape[0]), int(c.shape[1])))
            flat.append(c.reshape(-1).to(torch.int64))
        return torch.cat(flat).to(self.device), Packing(tuple(grids))

    @torch.inference_mode()
    def embed(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> LLM-ready features (h * w, C) per image."""
        if not codes:
            return []
        flat, packing = self._pack_codes(codes)
        return list(packing.split(self.model.embed(flat).cpu()))  # one copy for the batch

    @torch.inference_mode()
    def latents(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> raw Qwen-Image latents (1, 16, 2h, 2w) per image."""
        if not codes:
            return []
        flat, packing = self._pack_codes(codes)
        return self.model.draw_latents(self.model.embed(flat), packing)

    @torch.inference_mode()
    def reconstruct(self, codes: Sequence[torch.Tensor], decoder: str = "vae") -> list[torch.Tensor]:
        """Codes -> uint8 images (16h, 16w, 3) (the padded size, as the reference).

        ``decoder="vae"``: the drawer and the Qwen-Image VAE (the published path);
        ``decoder="pixel"``: the lightweight pixel decoder of the decoder stage.
        """
        if decoder == "pixel":
            if not codes:
                return []
            flat, packing = self._pack_codes(codes)
            return [img.cpu() for img in self.model.decode_pixels(self.model.embed(flat), packing)]
        if decoder != "vae":
            raise ConfigError(f"unknown decoder {decoder!r}; use vae or pixel")
        return [self.model.decode_latent(lat).cpu() for lat in self.latents(codes)]

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, out_dir, source_info: dict | None = None) -> dict:
        from viq.weights.save import save_viq

        return save_viq(self.model.state_dict(), self.config, out_dir, source_info)


def load_tokenizer(source=None, parts: Sequence[str] = ("encoder", "decoder", "drawer"), device=None,
                   dtype=None, config: ViQConfig | None = None, models_dir=None,
                   subfolder: str | None = None) -> ViQTokenizer:
    """Load a tokenizer from a viq directory, a reference-layout directory or a downloaded name.

    ``parts``: load only what the task needs (``("encoder",)`` to produce codes: no VAE, no adapter,
    no attention pool). ``source=None`` is the small demo model bundled with viq. A Hub repo id
    (with ``subfolder``, e.g. ``"XuminYu/ViQ_weights", subfolder="converted_16k"``) is found in the
    Hugging Face cache (HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE as huggingface_hub reads them).
    """
    from viq.weights.formats import load_model

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_source(source if subfolder is None else f"{source}:{subfolder}", models_dir)
    model, cfg, report = load_model(path, parts=[p for p in ALL_PARTS if p in parts], dtype=dtype,
                                    device=device, config=config)
    return ViQTokenizer(model, cfg, report, str(path))


def resolve_source(source, models_dir=None) -> Path:
    if source is None or source == "demo":
        return DEMO_MODEL
    p = Path(source).expanduser()
    if p.exists():  # absolute (symlinks kept): a store records it, and is read from other directories
        return Path(os.path.abspath(p))
    try:
        from viq.hub import resolve_model
    except ImportError:  # pragma: no cover
        resolve_model = None
    if resolve_model is not None:  # absolute too, even under a relative models directory
        return Path(os.path.abspath(resolve_model(str(source), models_dir)))
    from viq.errors import WeightsError

    raise WeightsError(f"{source}: no such weights directory or known model name")
