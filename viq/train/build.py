"""Model assembly from a recipe: the student, the MLLM, the frozen VAE, and the starting weights."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from viq.config import VAEConfig, ViQConfig, preset_config
from viq.errors import ConfigError, WeightsError
from viq.mllm.model import MLLM, Projector, build_llm
from viq.model.student import Student
from viq.quant import build_quantizer
from viq.train.model import TrainModel, trained_state
from viq.train.teacher import trunk_tensors, trunk_to_vit
from viq.weights.io import read_tensors

log = logging.getLogger("viq.train")

STATE_FILE = "model.safetensors"


@dataclass
class InitReport:
    """How the starting weights were applied (stage hand-over, open_clip, reference, viq)."""

    source: str
    format: str
    loaded: int = 0
    #: shape changed between checkpoint and model: re-initialised on purpose (init.reinit_mismatched)
    reinitialised: list[str] = field(default_factory=list)
    #: in the model, absent from the checkpoint: start fresh
    fresh: list[str] = field(default_factory=list)
    #: in the checkpoint, absent from the model: dropped
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.source} ({self.format}): {self.loaded} tensors loaded, {len(self.reinitialised)} "
                f"re-initialised (shape changed), {len(self.fresh)} fresh, {len(self.dropped)} dropped")


def build_target_vae(recipe, cfg: ViQConfig, seed: int) -> tuple[nn.Module, ViQConfig]:
    """The frozen Qwen-Image VAE (encoder included) whose posterior mean the drawer regresses.

    Without ``decoder.vae_path`` a random VAE of ``model.drawer.vae``'s shape (tests, tiny runs).
    Returns the VAE and the config with its architecture (what the exported drawer must build).
    """
    from diffusers import AutoencoderKLQwenImage

    path = recipe.decoder.vae_path
    if path:
        try:
            vae = AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"decoder.vae_path {path}: cannot load AutoencoderKLQwenImage ({exc})") from None
        fields = VAEConfig.model_fields
        found = VAEConfig(**{k: vae.config[k] for k in fields if k in vae.config and vae.config[k] is not None})
        if found != cfg.drawer.vae:
            log.info("the VAE at %s differs from model.drawer.vae; the drawer follows the VAE", path)
            cfg = cfg.model_copy(deep=True)
            cfg.drawer.vae = found
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(**cfg.drawer.vae.model_dump(exclude_none=True))
    vae.eval().requires_grad_(False)
    return vae, cfg


def build_student(recipe, cfg: ViQConfig) -> Student:
    q = recipe.quantizer
    quantizer = None
    if q is not None:
        levels = cfg.head.levels if q.type == "fsq" else None
        quantizer = build_quantizer(q.type, levels=levels, dim=q.bottleneck_dim, codebook_size=q.codebook_size,
                                    limit=q.limit, seed=recipe.run.seed + 4)
    return Student(cfg, quantizer, head=q is not None, pool=recipe.losses.cls_distill.enabled,
                   drawer=recipe.decoder.enabled, seed=recipe.run.seed)


def build_mllm(recipe, cfg: ViQConfig, vocab_size: int) -> Optional[MLLM]:
    if recipe.llm is None:
        return None
    llm = build_llm(recipe.llm, vocab_size=vocab_size, seed=recipe.run.seed + 5)
    hidden = llm.get_input_embeddings().embedding_dim
    p = recipe.llm.projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.run.seed + 6)
        projector = Projector(cfg.vit.width, hidden, p.type, p.pool)
    projector.requires_grad_(p.trainable)
    return MLLM(llm, projector, recipe.llm.max_length)


def _arch_vit(recipe):
    arch = recipe.teacher.arch
    return None if arch is None else preset_config(arch).vit


# ---- starting weights -----------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """auto: a run directory (training state), a viq directory, an open_clip trunk, or reference keys."""
    from viq.weights import keymaps

    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return "training"
        return "viq"  # viq's layout or the published converted_<size>/ folder: load_state reads both
    keys = list(read_tensors(path))
    if any(k.startswith(keymaps.TRAIN_PREFIX) or k.startswith("fusion_block.") for k in keys):
        return "reference"
    if any(k.startswith("visual.trunk.") for k in keys) or ("pos_embed" in keys and any(
            k.startswith("blocks.") for k in keys)):
        return "siglip2_openclip"
    return "reference"


def init_tensors(recipe, path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The starting checkpoint as tensors in TrainModel names; (tensors, format, notes)."""
    from viq.weights import keymaps
    from viq.weights.convert import adapt_shapes, is_training_layout, strip_training_layout
    from viq.weights.formats import load_state, map_reference

    fmt = "training" if recipe.init.stage else recipe.init.format
    if not path.exists():
        hint = " (run that stage first)" if recipe.init.stage else ""
        raise WeightsError(f"the starting checkpoint {path} does not exist{hint}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "training":
        f = path / STATE_FILE if path.is_dir() else path
        return read_tensors(f), fmt, []
    cfg = recipe.model
    if fmt == "siglip2_openclip":
        state, notes = trunk_to_vit(trunk_tensors(read_tensors(path)), cfg.vit, True)
        return {f"student.vit.{k}": v for k, v in state.items()}, fmt, notes
    if fmt == "reference":
        raw = read_tensors(path)
        dropped_note = []
        if is_training_layout(raw):
            raw, dropped, _ = strip_training_layout(raw, None)
            dropped_note = [f"dropped {len(v)} {g} tensors" for g, v in dropped.items()]
        mapped, dropped2, unknown = map_reference(raw, keymaps.ENCODER_FILE, str(path))
        notes = dropped_note + [f"dropped {len(v)} {g} tensors" for g, v in dropped2.items()]
        if unknown:
            notes.append(f"{len(unknown)} keys with no viq name, e.g. {unknown[0]}")
        notes += adapt_shapes(mapped, cfg)
        return {f"student.{k}": v for k, v in mapped.items()}, fmt, notes
    if fmt == "viq":
        try:
            _, state, report = load_state(path)
        except WeightsError:
            _, state, report = load_state(path, parts=("encoder", "decoder"))
        return {f"student.{k}": v for k, v in state.items()}, fmt, list(report.notes)
    raise ConfigError(f"unknown init.format {fmt!r}")


def quantizer_projections(tensors: dict[str, torch.Tensor], own) -> dict[str, torch.Tensor]:
    """The projections around the quantizer under the names the model uses for them.

    They are one role across stages: ``head.project_*`` in an FSQ student, the training-only
    ``bottleneck.project_*`` beside a non-FSQ quantizer (stage 2-1). A 2-1 -> 2-2 hand-over thus meets
    them as the same tensors, loaded where the shape still fits and re-initialised (on purpose) where not.
    """
    head, bottleneck = "student.head.project_", "student.bottleneck.project_"
    src, dst = (head, bottleneck) if any(k.startswith(bottleneck) for k in own) else (bottleneck, head)
    if any(k.startswith(dst) for k in tensors) or not any(k.startswith(src) for k in tensors):
        return tensors
    return {dst + k[len(src):] if k.startswith(src) else k: v for k, v in tensors.items()}


def apply_init(model: TrainModel, tensors: dict[str, torch.Tensor], reinit_mismatched: bool, source: str, fmt: str,
               notes: list[str]) -> InitReport:
    """Copy matching tensors into the model; shape changes only with ``reinit_mismatched``, reported."""
    own = model.state_dict()
    tensors = quantizer_projections(tensors, own)
    report = InitReport(source, fmt, notes=list(notes))
    mismatched = []
    with torch.no_grad():
        for k, v in tensors.items():
            if k not in own:
                report.dropped.append(k)
            elif tuple(own[k].shape) != tuple(v.shape):
                mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
            else:
                own[k].copy_(v.to(own[k].dtype))
                report.loaded += 1
    if mismatched and not reinit_mismatched:
        raise WeightsError(f"{source}: {len(mismatched)} tensors change shape ({', '.join(mismatched[:4])}); set "
                           "init.reinit_mismatched: true to re-initialise them on purpose")
    report.reinitialised = mismatched
    report.fresh = [k for k in trained_state(model) if k not in tensors]
    return report


def _grouped(keys: list[str], depth: int = 3) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        g = ".".join(k.split(" ")[0].split(".")[:depth])
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items())
