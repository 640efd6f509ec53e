"""Loading ViQ weights from the published reference layout or viq's own directory, strictly.

Reference layout: ``model_viq_fsq_<size>.pth`` (encoder), ``embedder.pth``, ``index_drawer.pth``,
usually inside ``converted_<size>/``. viq layout: ``config.json`` + one safetensors file per part.
Every tensor of the parts asked for is filled from the files, or loading fails listing the keys;
published tensors inference does not need are dropped by name and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from viq.config import FSQ_PRESETS, ViQConfig, fsq_size_name, giant_config, so400m_config
from viq.errors import KeyMismatchError, WeightsError
from viq.model.viq_model import ALL_PARTS, PART_PREFIXES, ViQModel, part_of
from viq.weights import keymaps
from viq.weights.integrity import check_digest, check_values
from viq.weights.io import read_tensors, tensors_fingerprint

VIQ_FORMAT = "viq-weights"
PART_FILES = {p: f"{p}.safetensors" for p in ALL_PARTS}


@dataclass
class LoadReport:
    source: str
    layout: str
    recognised: str
    parts: tuple[str, ...]
    part_sources: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


# ---- model skeletons -----------------------------------------------------------------------------

def build_empty(cfg: ViQConfig, parts=ALL_PARTS) -> ViQModel:
    """The model on the meta device: no memory, no init; weights are assigned at load."""
    with torch.device("meta"):
        return ViQModel(cfg, parts)


def _skeleton(cfg: ViQConfig, parts) -> dict[str, torch.Tensor]:
    key = (cfg.model_dump_json(), tuple(parts))
    if key not in _SKELETONS:  # building a model, even on meta, is the slow part of a small load
        if len(_SKELETONS) > 8:
            _SKELETONS.clear()
        _SKELETONS[key] = build_empty(cfg, parts).state_dict()
    return _SKELETONS[key]


_SKELETONS: dict = {}


def expected_shapes(cfg: ViQConfig, parts=ALL_PARTS) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _skeleton(cfg, parts).items()}


def expected_dtypes(cfg: ViQConfig, parts=ALL_PARTS) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in _skeleton(cfg, parts).items()}


def check_keys(where: str, got: dict[str, torch.Tensor], expected: dict[str, tuple], unexpected_extra=(),
               file_keymap=None):
    """Strict: every expected key present with its shape, nothing else. ``file_keymap`` (reference ->
    viq renames) lets the error also show each key as the file names it."""
    missing = set(expected) - set(got)
    unexpected = (set(got) - set(expected)) | set(unexpected_extra)
    mismatched = [f"{k} {tuple(got[k].shape)} != {expected[k]}" for k in set(got) & set(expected)
                  if tuple(got[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        back = keymaps.reverse(file_keymap) if file_keymap else None
        raise KeyMismatchError(where, missing, unexpected, mismatched,
                               file_name=(lambda k: keymaps.rename(k, back)) if back else None)


# ---- reference layout ----------------------------------------------------------------------------

@dataclass
class ReferenceFiles:
    folder: Path
    encoder: Path | None
    embedder: Path | None
    drawer: Path | None
    size: str | None


def find_reference_files(path: Path) -> ReferenceFiles:
    path = Path(path)
    if path.is_file():
        path = path.parent
    encoders = sorted(path.glob("model_viq_fsq*.pth"))
    if not encoders:
        subdirs = sorted(p for p in path.glob("converted_*") if p.is_dir())
        if len(subdirs) == 1:
            return find_reference_files(subdirs[0])
        if len(subdirs) > 1:
            raise WeightsError(f"{path}: holds several sizes ({', '.join(p.name for p in subdirs)}); "
                               "pass the one you want, e.g. --model " + str(subdirs[0]))
    if len(encoders) > 1:
        raise WeightsError(f"{path}: several encoder files ({', '.join(p.name for p in encoders)}); keep one")
    enc = encoders[0] if encoders else None
    emb, drw = path / "embedder.pth", path / "index_drawer.pth"
    if enc is None and not emb.exists() and not drw.exists():
        raise WeightsError(f"{path}: not a ViQ weights directory (no config.json, no model_viq_fsq_<size>.pth, "
                           "embedder.pth or index_drawer.pth). Give a directory made by `viqctl convert` "
                           "or the published converted_<size>/ folder")
    size = None
    for name in ([enc.stem] if enc else []) + [path.name]:
        m = re.search(r"(2k|4k|8k|16k|64k)$", name)
        if m:
            size = m.group(1)
            break
    return ReferenceFiles(path, enc, emb if emb.exists() else None, drw if drw.exists() else None, size)


def map_reference(tensors: dict[str, torch.Tensor], mapping, where: str):
    """Rename reference keys to viq keys; returns (mapped, dropped-by-group, unknown keys)."""
    mapped, dropped, unknown = {}, {}, []
    for key, t in tensors.items():
        group = keymaps.unused_group(key)
        if group:
            dropped.setdefault(group, []).append(key)
            continue
        new = keymaps.rename(key, mapping)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = t
    return mapped, dropped, unknown


def _count(prefix: str, keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_reference_config(enc: dict[str, torch.Tensor], size: str | None, codebook_rows: int | None):
    """Recognise a preset architecture from tensor shapes (ViT heads cannot be read from shapes)."""
    if "vit.pos_embed" not in enc or "head.project_in.weight" not in enc:
        raise WeightsError("cannot recognise the architecture: pos_embed or the FSQ project_in is missing")
    width = enc["vit.pos_embed"].shape[-1]
    depth = _count("vit.blocks.", enc)
    mlp = enc["vit.blocks.0.mlp.fc1.weight"].shape[0] if depth else 0
    d = enc["head.project_in.weight"].shape[0]
    if size is None and codebook_rows is not None:
        size = next((n for n, lv in FSQ_PRESETS.items() if _prod(lv) == codebook_rows), None)
    if size is None and d == 6:
        size = "64k"
    if size is None or len(FSQ_PRESETS[size]) != d:
        raise WeightsError(f"cannot tell the FSQ size ({d} code dims); name the file model_viq_fsq_<size>.pth "
                           "or put a viq config.json beside it")
    for name, make in (("giant", giant_config), ("so400m", so400m_config)):
        cfg = make(size)
        if (cfg.vit.width, cfg.vit.depth, cfg.vit.mlp_hidden) == (width, depth, mlp):
            return cfg, f"{name} {size}"
    raise WeightsError(f"the weights (width {width}, depth {depth}, MLP {mlp}) match no preset "
                       "(giant 1536/40/6144, so400m 1152/27/4304); put a viq config.json (as written by "
                       "`viqctl convert`) beside them to name the architecture")


def _prod(levels):
    out = 1
    for v in levels:
        out *= v
    return out


def check_codebook(table: torch.Tensor, cfg: ViQConfig, where: str, notes: list[str]) -> None:
    from viq.quant.fsq import FSQ

    implicit = FSQ(cfg.head.levels).codebook()
    if tuple(table.shape) != tuple(implicit.shape):
        raise WeightsError(f"{where}: codebook {tuple(table.shape)} does not fit FSQ levels {cfg.head.levels}")
    diff = (table.float() - implicit).abs().max().item()
    if diff > 2 ** -8:  # a bf16-rounded table is accepted as published
        raise WeightsError(f"{where}: codebook does not match FSQ levels {cfg.head.levels} (max diff {diff:.3g})")
    if diff > 0:
        notes.append(f"{where}: the codebook table is rounded (max diff {diff:.3g}, e.g. bf16); used as published")


def reference_state(ref: ReferenceFiles, parts, config: ViQConfig | None):
    """Read a reference-layout directory into viq names for ``parts``; strict. Returns (cfg, state, report)."""
    parts = tuple(parts)
    dropped: dict[str, list[str]] = {}
    notes: list[str] = []
    sources: dict[str, str] = {}
    enc = emb = drw = None
    if ref.encoder is not None:
        raw = read_tensors(ref.encoder)
        enc, dr, unknown = map_reference(raw, keymaps.ENCODER_FILE, str(ref.encoder))
        for g, ks in dr.items():
            dropped.setdefault(g, []).extend(ks)
    if ref.embedder is not None:
        emb, _, emb_unknown = map_reference(read_tensors(ref.embedder), keymaps.EMBEDDER_FILE, str(ref.embedder))
    if ref.drawer is not None:
        drw, dr, drw_unknown = map_reference(read_tensors(ref.drawer), keymaps.DRAWER_FILE, str(ref.drawer))
        for g, ks in dr.items():
            dropped.setdefault(g, []).extend(f"index_drawer.pth:{k}" for k in ks)

    recognised = "config.json"
    if config is None:
        if enc is None:
            raise WeightsError(f"{ref.folder}: without the encoder file the architecture is unknown; "
                               "put a viq config.json beside the files")
        rows = emb["head.codebook"].shape[0] if emb is not None else None
        config, recognised = infer_reference_config(enc, ref.size, rows)

    # The drawer's VAE skeleton needs diffusers: build its shapes only when the drawer is asked for.
    full = expected_shapes(config, ALL_PARTS[:4] if "drawer" in parts else ALL_PARTS[:3])
    state: dict[str, torch.Tensor] = {}
    if enc is not None:
        exp = {k: s for k, s in full.items() if k != "head.codebook"}
        if "drawer" not in parts:  # its tensors ride along in the file, unread
            exp.update({k: tuple(v.shape) for k, v in enc.items() if k.startswith(PART_PREFIXES["drawer"])})
        check_keys(str(ref.encoder), enc, exp, unexpected_extra=unknown, file_keymap=keymaps.ENCODER_FILE)
    if "encoder" in parts or "pool" in parts:
        if enc is None:
            raise WeightsError(f"{ref.folder}: encoding needs model_viq_fsq_<size>.pth, which is missing")
        for p in ("encoder", "pool"):
            if p in parts:
                state.update({k: v for k, v in enc.items() if part_of(k) == p})
                sources[p] = ref.encoder.name
    dec_keys = {k: s for k, s in full.items() if part_of(k) == "decoder"}
    if "decoder" in parts:
        if emb is not None:
            check_keys(str(ref.embedder), emb, dec_keys, unexpected_extra=emb_unknown,
                       file_keymap=keymaps.EMBEDDER_FILE)
            check_codebook(emb["head.codebook"], config, str(ref.embedder), notes)
            state.update(emb)
            sources["decoder"] = ref.embedder.name
        elif enc is not None:
            from viq.quant.fsq import FSQ

            state.update({k: v for k, v in enc.items() if part_of(k) == "decoder"})
            state["head.codebook"] = FSQ(config.head.levels).codebook()
            sources["decoder"] = f"{ref.encoder.name} (no embedder.pth; implicit codebook)"
        else:
            raise WeightsError(f"{ref.folder}: embedding needs embedder.pth or the encoder file")
    if "drawer" in parts:
        if drw is not None:
            exp = {k: s for k, s in full.items() if part_of(k) in ("decoder", "drawer")}
            check_keys(str(ref.drawer), drw, exp, unexpected_extra=drw_unknown, file_keymap=keymaps.DRAWER_FILE)
            check_codebook(drw["head.codebook"], config, str(ref.drawer), notes)
            if "decoder" in parts:
                differ = [k for k in dec_keys if not torch.equal(drw[k].float(), state[k].float())]
                if differ:
                    raise WeightsError(f"{ref.drawer} and {sources['decoder']} hold different projector weights "
                                       f"({len(differ)} tensors, e.g. {differ[0]}); they must come from one model")
            state.update({k: v for k, v in drw.items() if part_of(k) == "drawer"})
            sources["drawer"] = ref.drawer.name
        elif enc is not None:
            state.update({k: v for k, v in enc.items() if part_of(k) == "drawer"})
            sources["drawer"] = f"{ref.encoder.name} (no index_drawer.pth)"
        else:
            raise WeightsError(f"{ref.folder}: drawing needs index_drawer.pth or the encoder file")
    report = LoadReport(str(ref.folder), "reference", recognised, parts, sources, dropped, notes)
    return config, state, report


# ---- viq layout ----------------------------------------------------------------------------------

def read_viq_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise WeightsError(f"{path}: not a viq config (no 'model' section)")
    return meta


def parse_config(meta: dict, where: str) -> ViQConfig:
    from pydantic import ValidationError

    try:
        return ViQConfig.model_validate(meta["model"])
    except ValidationError as exc:
        raise WeightsError(f"{where}: invalid model config: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def viq_state(folder: Path, parts):
    meta = read_viq_config(folder)
    cfg = parse_config(meta, str(folder / "config.json"))
    files = meta.get("parts", {})
    full = expected_shapes(cfg, parts)
    state, sources = {}, {}
    for p in parts:
        entry = files.get(p)
        if entry is None:
            hint = " (train one with recipes/decoder.yaml, or use --decoder vae)" if p == "pixel_decoder" else ""
            raise WeightsError(f"{folder}: has no '{p}' part (parts: {', '.join(files) or 'none'}){hint}")
        check_digest(folder, p, entry if isinstance(entry, dict) else {})  # raises naming the file
        path = folder / entry["file"]
        tensors = read_tensors(path)
        check_keys(str(path), tensors, {k: s for k, s in full.items() if part_of(k) == p})
        state.update(tensors)
        sources[p] = entry["file"]
    notes: list[str] = []
    if "head.codebook" in state:  # FSQ's table is implied by the levels: a stored one must be it
        check_codebook(state["head.codebook"], cfg, str(folder / sources["decoder"]), notes)
    report = LoadReport(str(folder), "viq", meta.get("model", {}).get("name", "config.json"), tuple(parts), sources,
                        notes=notes)
    return cfg, state, report


def is_viq_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except Exception:
        return False
    if not isinstance(meta, dict) or meta.get("format") != VIQ_FORMAT:
        return False
    # a viq config.json copied beside reference-layout .pth files only names their architecture
    entries = [e for e in (meta.get("parts") or {}).values() if isinstance(e, dict) and e.get("file")]
    if any(Path(path).glob("model_viq_fsq_*.pth")) and not any((Path(path) / e["file"]).is_file() for e in entries):
        return False
    return True


# ---- public --------------------------------------------------------------------------------------

def load_state(source, parts=ALL_PARTS[:4], config: ViQConfig | None = None):
    """(config, state dict in viq names, report) from any supported layout: a viq directory, the
    published reference layout, or a reference training checkpoint (converted in memory)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    parts = tuple(p for p in ALL_PARTS if p in set(parts))
    if "pixel_decoder" in parts and not is_viq_dir(path):
        raise WeightsError(f"{path}: the published layout has no pixel decoder; use the VAE drawer (--decoder vae)")
    if is_viq_dir(path):
        cfg, state, report = viq_state(path, parts)
    elif path.is_file() and path.suffix in (".pth", ".pt", ".bin", ".safetensors") \
            and not path.name.startswith("model_viq_fsq"):
        cfg, state, report = training_state(path, parts, config)
    else:
        folder = path.parent if path.is_file() else path
        if config is None and (folder / "config.json").is_file():
            config = parse_config(read_viq_config(folder), str(folder / "config.json"))
        cfg, state, report = reference_state(find_reference_files(path), parts, config)
    folder = Path(report.source)
    check_values(state, expected_dtypes(cfg, parts),
                 lambda k: str(folder / report.part_sources[part_of(k)].split(" (")[0])
                 if part_of(k) in report.part_sources and folder.is_dir() else str(report.source))
    report.fingerprints = {p: tensors_fingerprint({k: v for k, v in state.items() if part_of(k) == p})
                           for p in parts}
    return cfg, state, report


def available_parts(source) -> tuple[str, ...]:
    """Every part a source holds: a viq folder lists them; other layouts hold the four published ones."""
    path = Path(source).expanduser()
    if is_viq_dir(path):
        listed = read_viq_config(path).get("parts") or {}
        return tuple(p for p in ALL_PARTS if p in listed)
    return ALL_PARTS[:4]


def training_state(path: Path, parts, config: ViQConfig | None):
    """A reference training checkpoint (``vision_tower.pth``), converted in memory as `viqctl convert` does."""
    from viq.weights.convert import convert_training_checkpoint

    cfg, full, recognised, dropped, adaptations = convert_training_checkpoint(path, None, config)
    state = {k: v for k, v in full.items() if part_of(k) in parts}
    report = LoadReport(str(path), "training", recognised, tuple(parts), {p: path.name for p in parts}, dropped,
                        notes=[f"adapted: {a}" for a in adaptations])
    return cfg, state, report


def load_model(source, parts=ALL_PARTS[:4], dtype=torch.float32, device="cpu", config: ViQConfig | None = None):
    """Build the parts asked for and fill every tensor from the files: (model, config, report)."""
    cfg, state, report = load_state(source, parts, config)
    model = build_empty(cfg, report.parts)
    converted = {}
    for k, v in state.items():
        keep_fp32 = k == "head.codebook"  # code values stay exact; cast at use
        converted[k] = v.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    model.to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{source}: tensors left unfilled: {', '.join(left[:20])}")
    model.eval().requires_grad_(False)  # inference load; training re-enables what it trains
    return model, cfg, report


def split_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        out.setdefault(part_of(k), {})[k] = v
    return out


def prefixes_of(part: str):
    return PART_PREFIXES[part]


def size_name(cfg: ViQConfig) -> str:
    return fsq_size_name(cfg.head.levels) or "x".join(map(str, cfg.head.levels))


def model_fingerprints(source, config: ViQConfig | None = None) -> dict[str, str]:
    """Fingerprints of the encoder and decoder parts without loading them into memory.

    viq directories record them in config.json; reference files are memory-mapped and sampled.
    """
    path = Path(source).expanduser()
    if is_viq_dir(path):
        parts = read_viq_config(path).get("parts", {})
        return {p: parts[p]["fingerprint"] for p in ("encoder", "decoder") if p in parts and "fingerprint" in parts[p]}
    _, _, report = load_state(path, parts=("encoder", "decoder"), config=config)
    return report.fingerprints
