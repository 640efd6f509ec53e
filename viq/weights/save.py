"""Writing viq's own weights directory (config.json + one safetensors file per part), and the
published reference layout for tools that read it."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

import torch

from viq.config import ViQConfig
from viq.model.viq_model import ALL_PARTS, part_of
from viq.weights import keymaps
from viq.weights.integrity import publish_folder
from viq.weights.card import write_card
from viq.weights.io import sha256_file, tensors_fingerprint, write_json, write_safetensors


def versions() -> dict:
    import viq

    out = {"viq": viq.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except Exception:  # pragma: no cover
        pass
    return out


def save_viq(state: dict[str, torch.Tensor], cfg: ViQConfig, out_dir, source_info: dict | None = None,
             dtype: torch.dtype | None = None) -> dict:
    """Write every part present in ``state`` as one folder, published whole (see ``publish_folder``):
    a reader of ``out_dir`` sees the old weights or the new ones, never a mix."""
    with publish_folder(Path(out_dir)) as folder:
        return write_viq_files(state, cfg, folder, source_info, dtype)


def write_viq_files(state: dict[str, torch.Tensor], cfg: ViQConfig, out_dir, source_info: dict | None = None,
                    dtype: torch.dtype | None = None) -> dict:
    """The parts, then config.json (with each part's sha256, checked on load) last, into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if dtype is not None and v.is_floating_point() and k != "head.codebook":
            v = v.to(dtype)
        by_part.setdefault(part_of(k), {})[k] = v
    parts = {}
    for p in ALL_PARTS:
        if p not in by_part:
            continue
        name = f"{p}.safetensors"
        nbytes = write_safetensors(by_part[p], out / name, metadata={"format": "pt", "viq_part": p})
        parts[p] = {"file": name, "bytes": nbytes, "sha256": sha256_file(out / name),
                    "fingerprint": tensors_fingerprint(by_part[p]),
                    "parameters": int(sum(t.numel() for t in by_part[p].values())),
                    "dtype": str(next(iter(by_part[p].values())).dtype).replace("torch.", "")}
    meta = {"format": "viq-weights", "version": 1, "model": cfg.model_dump(mode="json"), "parts": parts,
            "source": source_info or {}, "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_card(meta, out)  # README.md: the model card (config, source digest, levels, how to load)
    write_json(meta, out / "config.json")
    return meta


def export_reference(state: dict[str, torch.Tensor], cfg: ViQConfig, out_dir, size: str) -> list[Path]:
    """The three published files (model_viq_fsq_<size>.pth, embedder.pth, index_drawer.pth).

    Plain tensor dicts saved with torch.save: readable with ``torch.load(weights_only=True)``.
    The encoder file carries the VAE decoder only (viq does not hold the VAE encoder).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc_map = keymaps.reverse(keymaps.ENCODER_FILE)
    emb_map = keymaps.reverse(keymaps.EMBEDDER_FILE)
    enc, emb, drw = {}, {}, {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        p = part_of(k)
        if p == "pixel_decoder":  # the reference layout has no pixel decoder (convert reports it dropped)
            continue
        if k != "head.codebook":
            enc[keymaps.rename(k, enc_map)] = v
        if p == "decoder":
            emb[keymaps.rename(k, emb_map)] = v
            drw[keymaps.rename(k, emb_map)] = v
        if p == "drawer":
            drw[keymaps.rename(k, enc_map)] = v
    written = []
    # Names the architecture for viq (the reference code ignores this file).
    write_json({"format": "viq-reference-config", "model": cfg.model_dump(mode="json")}, out / "config.json")
    written.append(out / "config.json")
    for name, sd in ((f"model_viq_fsq_{size}.pth", enc), ("embedder.pth", emb), ("index_drawer.pth", drw)):
        if not sd:
            continue
        path = out / name
        tmp = out / f".{name}.tmp"
        torch.save(sd, tmp)
        tmp.replace(path)
        written.append(path)
    return written
