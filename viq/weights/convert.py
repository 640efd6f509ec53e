"""Training checkpoints -> inference weights, strictly.

Unlike the reference converter (non-strict load: a renamed key silently stays random), every tensor
of the target model must come from the checkpoint, every dropped key is named by group in the
report, and shape adaptations (position grid, patch kernel) happen only when shapes ask for them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from viq.config import ViQConfig, fsq_levels, fsq_size_name
from viq.errors import ConfigError, WeightsError
from viq.quant.fsq import FSQ
from viq.weights import keymaps
from viq.weights.formats import (available_parts, check_keys, expected_shapes, infer_reference_config, is_viq_dir,
                                 load_state, map_reference, parse_config, read_viq_config)
from viq.weights.integrity import publish_folder, refuse_in_place
from viq.weights.io import read_tensors, sha256_file
from viq.weights.save import export_reference, write_viq_files


@dataclass
class ConvertReport:
    kind: str
    source: str
    source_sha256: str | None
    levels: list[int]
    recognised: str
    dropped: dict[str, list[str]] = field(default_factory=dict)
    adaptations: list[str] = field(default_factory=list)
    parts: dict[str, dict] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["dropped"] = {g: {"count": len(ks), "keys": ks[:5]} for g, ks in self.dropped.items()}
        return d


def is_training_layout(tensors: dict) -> bool:
    return any(k.startswith(keymaps.TRAIN_PREFIX) for k in tensors)


def strip_training_layout(tensors: dict[str, torch.Tensor], levels: list[int] | None):
    """Training keys -> converted-file keys; returns (tensors, dropped by group, levels found)."""
    out, dropped = {}, {}
    found_levels = None
    for key, t in tensors.items():
        group = next((g for g, match in keymaps.TRAIN_DROPPED_GROUPS.items() if match(key)), None)
        if group is not None:
            if key.endswith("vq_low.fsq._levels") or key.endswith("vq_low._levels"):
                found_levels = [int(v) for v in t.tolist()]
            dropped.setdefault(group, []).append(key)
            continue
        if not key.startswith(keymaps.TRAIN_PREFIX):
            dropped.setdefault("outside the vision tower", []).append(key)
            continue
        name = key[len(keymaps.TRAIN_PREFIX):]
        for src, dst in keymaps.TRAIN_RENAMES:
            name = name.replace(src, dst)
        out[name] = t
    if found_levels is not None and levels is not None and found_levels != list(levels):
        raise ConfigError(f"the checkpoint's FSQ levels are {found_levels}, but {list(levels)} were asked for")
    return out, dropped, found_levels


def adapt_shapes(enc: dict[str, torch.Tensor], cfg: ViQConfig) -> list[str]:
    """Resize the position grid and the patch kernel when (and only when) their shapes differ."""
    notes = []
    pe = enc.get("vit.pos_embed")
    g = cfg.vit.pos_grid
    if pe is not None and pe.shape[1] != g * g:
        side = math.isqrt(pe.shape[1])
        if side * side != pe.shape[1]:
            raise WeightsError(f"pos_embed has {pe.shape[1]} positions, not a square grid")
        grid = pe.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        enc["vit.pos_embed"] = grid.permute(0, 2, 3, 1).reshape(1, g * g, -1).to(pe.dtype)
        notes.append(f"position grid {side}x{side} -> {g}x{g} (bicubic)")
    w = enc.get("vit.patch_embed.proj.weight")
    p = cfg.vit.patch
    if w is not None and tuple(w.shape[-2:]) != (p, p):
        enc["vit.patch_embed.proj.weight"] = F.interpolate(w.float(), size=(p, p), mode="bicubic",
                                                           align_corners=False).to(w.dtype)
        notes.append(f"patch kernel {w.shape[-1]}x{w.shape[-2]} -> {p}x{p} (bicubic)")
    return notes


def _config_for(tensors_viq: dict, config: ViQConfig | None, levels: list[int] | None, beside: Path | None):
    if config is None and beside is not None and (beside / "config.json").is_file():
        config = parse_config(read_viq_config(beside), str(beside / "config.json"))
    if config is not None:
        if levels is not None and list(config.head.levels) != list(levels):
            config = config.with_levels(levels)
        return config, "config.json"
    if levels is None:
        raise ConfigError("name the FSQ levels (--size 16k or --levels 8 8 8 6 5)")
    size = fsq_size_name(levels)
    if size is None:
        raise ConfigError(f"levels {levels} are not a preset; give a viq config.json (--config) for this model")
    return infer_reference_config(tensors_viq, size, None)


def convert_training_checkpoint(path: Path, levels: list[int] | None, config: ViQConfig | None):
    raw = read_tensors(path)
    if not is_training_layout(raw):
        raise WeightsError(f"{path}: no keys under {keymaps.TRAIN_PREFIX}; not a ViQ training checkpoint")
    enc_ref, dropped, found = strip_training_layout(raw, levels)
    levels = levels or found
    enc, unused, unknown = map_reference(enc_ref, keymaps.ENCODER_FILE, str(path))
    for g, ks in unused.items():
        dropped.setdefault(g, []).extend(ks)
    cfg, recognised = _config_for(enc, config, levels, path.parent)
    adaptations = adapt_shapes(enc, cfg)
    # The decode part reads the same tensors; its code table is FSQ's implicit codebook.
    enc["head.codebook"] = FSQ(cfg.head.levels).codebook()
    expected = expected_shapes(cfg)
    check_keys(str(path), enc, expected, unexpected_extra=unknown, file_keymap=keymaps.ENCODER_FILE)
    return cfg, enc, recognised, dropped, adaptations


#: (viq config, state in viq names, description) of a source only a caller's reader understands, or None.
StepReader = Callable[[Path], Optional[tuple]]


def files_digest(folder: Path) -> str:
    """One sha256 for the weights and config files of a folder (names and contents, in name order)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".pth", ".pt", ".bin", ".safetensors", ".json"):
            h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def convert(source, out_dir, levels=None, size: str | None = None, config: ViQConfig | None = None,
            reference_layout: bool = False, dtype: torch.dtype | None = None,
            step_reader: StepReader | None = None) -> ConvertReport:
    """Convert a training checkpoint (reference or viq) or re-export weights into viq's format.

    ``step_reader`` reads one step checkpoint of a viq training run (``viq.train.export.read_step_checkpoint``,
    which ``viqctl convert`` passes): rebuilding such a step needs training code, which inference never imports.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise WeightsError(f"{src}: no such file or directory")
    refuse_in_place(src, Path(out_dir))
    if size is not None and levels is not None:
        raise ConfigError("give either --size or --levels, not both")
    lv = fsq_levels(size) if size else (fsq_levels(levels) if levels else None)
    if src.is_file() and src.suffix in (".pth", ".pt", ".bin", ".safetensors") and not src.name.startswith(
            "model_viq_fsq"):
        cfg, state, recognised, dropped, adaptations = convert_training_checkpoint(src, lv, config)
        kind, digest = "reference training checkpoint", sha256_file(src)
    elif src.is_dir() and (step := step_reader(src) if step_reader else None) is not None:
        # one step of viq's own training run: rebuilt from the run's recipe.yaml, as the run would export it
        cfg, state, recognised = step
        if lv is not None and list(cfg.head.levels) != list(lv):
            raise ConfigError(f"{src} holds FSQ levels {cfg.head.levels}, not {lv}")
        dropped, adaptations = {}, []
        kind, digest = "viq training checkpoint", files_digest(src)
    elif src.is_dir() and (src / "training.json").is_file():
        # viq's own training run folder: its inference weights are written to <run>/viq at the end
        weights = src / "viq"
        if not is_viq_dir(weights):
            raise WeightsError(f"{src}: this training run has no finished weights in {weights} (only FSQ runs that "
                               "completed write them); resume it to the end, or convert a finished run")
        refuse_in_place(weights, Path(out_dir))
        cfg, state, report = load_state(weights, parts=available_parts(weights), config=config)
        if lv is not None and list(cfg.head.levels) != list(lv):
            raise ConfigError(f"{src} holds FSQ levels {cfg.head.levels}, not {lv}")
        recognised, dropped, adaptations = report.recognised, report.dropped, []
        kind, digest = "viq training run", files_digest(weights)
    else:
        if src.is_dir() and src.name.startswith("step-") and not is_viq_dir(src):
            raise WeightsError(f"{src}: a step checkpoint of a viq training run; convert it with `viqctl convert` "
                               "(or viq.train.export.convert_step in Python)")
        cfg, state, report = load_state(src, parts=available_parts(src), config=config)
        if lv is not None and list(cfg.head.levels) != list(lv):
            raise ConfigError(f"{src} holds FSQ levels {cfg.head.levels}, not {lv}")
        recognised, dropped, adaptations = report.recognised, report.dropped, []
        kind = "viq weights" if is_viq_dir(src) else "reference inference layout"
        digest = files_digest(src if src.is_dir() else src.parent)
    out = Path(out_dir)
    source_info = {"kind": kind, "path": str(src), "sha256": digest, "recognised": recognised}
    report = ConvertReport(kind, str(src), digest, list(cfg.head.levels), recognised, dropped, adaptations)
    # one folder, published whole: a kill or an error mid-way leaves the old --out as it was
    with publish_folder(out) as folder:
        meta = write_viq_files(state, cfg, folder, source_info, dtype=dtype)
        for p, info in meta["parts"].items():
            report.parts[p] = {k: info[k] for k in ("parameters", "dtype", "bytes", "file")}
            report.written.append(str(out / info["file"]))
            report.bytes_written += info["bytes"]
        report.written.append(str(out / "config.json"))
        if reference_layout:
            name = fsq_size_name(cfg.head.levels) or "custom"
            pix = sorted(k for k in state if k.startswith("pixel_decoder."))
            if pix:
                report.dropped["pixel decoder (no place in the reference layout; kept in the viq folder)"] = pix
            for path in export_reference(state, cfg, folder / f"converted_{name}", name):
                report.written.append(str(out / path.relative_to(folder)))
                report.bytes_written += path.stat().st_size
    return report
