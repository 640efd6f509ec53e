"""Lossless checks of a model, and fingerprints that identify what it computes.

One model: the full forward path (ViT -> head -> FSQ values -> features -> drawer in one pass,
no indices) and the split path (stored codes first, then embed / draw from the codes alone through
the codebook) must agree bit for bit, with all images packed and with each image alone. Two models (``against``): identical fingerprints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from viq.tokenizer import ViQTokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def example_images() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes()).hexdigest()


def fingerprint(name: str, codes: torch.Tensor, feats: torch.Tensor, latent: torch.Tensor, pixels: torch.Tensor) -> dict:
    c = codes.to(torch.int64)
    return {"image": name, "grid": [int(c.shape[0]), int(c.shape[1])], "codes_sum": int(c.sum()),
            "distinct_codes": int(torch.unique(c).numel()), "codes_sha256": _sha(c),
            "features_abs_sum": float(feats.double().abs().sum()), "latent_abs_sum": float(latent.double().abs().sum()),
            "pixels_sum": int(pixels.to(torch.int64).sum()), "pixels_sha256": _sha(pixels)}


def environment(tok: ViQTokenizer) -> dict:
    from viq.weights.save import versions

    return {"device": str(tok.device), "dtype": str(tok.dtype).replace("torch.", ""), **versions()}


@dataclass
class VerifyResult:
    ok: bool
    fingerprints: list[dict]
    mismatches: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.inference_mode()
def _full_path(model, pixels, slots):
    """Images -> FSQ code values -> features -> latents -> pixels in one pass over one packing.

    Features come from the quantised values themselves, never from indices and the stored
    codebook, so a wrong index order or a tampered codebook table makes the two paths differ.
    """
    model.require("encoder", "decoder")
    tokens, packing = model.vit(pixels)
    values = model.head.fsq.quantize(model.head.pre_quant(tokens, packing))
    indices = model.head.fsq.codes_to_indices(values)
    feats = model.head.decode_codes(values)
    latents = model.draw_latents(feats, packing)
    return {"codes": [i.reshape(h, w, slots).cpu() for i, (h, w) in zip(packing.split(indices, slots), packing.grids)],
            "features": [f.cpu() for f in packing.split(feats)], "latents": [x.cpu() for x in latents],
            "pixels": [model.decode_latent(x).cpu() for x in latents]}


@torch.inference_mode()
def _split_path(tok, pixels):
    """Images -> codes (stored form) -> embed / draw from the codes alone."""
    codes = tok.encode_pixels(pixels)
    return {"codes": codes, "features": tok.embed(codes), "latents": [x.cpu() for x in tok.latents(codes)],
            "pixels": tok.reconstruct(codes)}


def _concat(runs):
    return {k: [x for r in runs for x in r[k]] for k in runs[0]}


@torch.inference_mode()
def verify_model(tok: ViQTokenizer, named_pixels: list[tuple[str, torch.Tensor]],
                 feature_rtol: float = 1e-5) -> VerifyResult:
    """Bit-for-bit: full path == split path, all images packed and each image alone.

    Between the packed and the one-by-one runs, floating-point GEMMs may round differently (the
    batch shape changes the kernel), so there the codes must be identical and features / latents
    agree within ``feature_rtol`` of the array's max, pixels within 1 grey level.
    """
    names = [n for n, _ in named_pixels]
    pixels = [p.to(tok.device, tok.dtype) for _, p in named_pixels]
    slots = tok.config.head.slots
    runs = {"packed": (_full_path(tok.model, pixels, slots), _split_path(tok, pixels)),
            "one by one": (_concat([_full_path(tok.model, [p], slots) for p in pixels]),
                           _concat([_split_path(tok, [p]) for p in pixels]))}
    mismatches = []
    for mode, (full, split) in runs.items():
        for key in ("codes", "features", "latents", "pixels"):
            for name, a, b in zip(names, full[key], split[key]):
                if a.shape != b.shape or not torch.equal(a, b):
                    diff = "shape" if a.shape != b.shape else f"max |diff| {(a.double() - b.double()).abs().max():.3g}"
                    mismatches.append(f"{name}: {key}: full path != split path ({mode}; {diff})")
    packed, single = runs["packed"][0], runs["one by one"][0]
    for name, a, b in zip(names, packed["codes"], single["codes"]):
        if not torch.equal(a, b):
            mismatches.append(f"{name}: codes differ between packed and one-by-one encoding")
    for key in ("features", "latents"):
        for name, a, b in zip(names, packed[key], single[key]):
            rel = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
            if rel > feature_rtol:
                mismatches.append(f"{name}: {key} packed vs one-by-one differ by {rel:.3g} (> {feature_rtol:g})")
    for name, a, b in zip(names, packed["pixels"], single["pixels"]):
        d = (a.int() - b.int()).abs().max().item()
        if d > 1:
            mismatches.append(f"{name}: pixels packed vs one-by-one differ by {d} grey levels (> 1)")
    full = runs["packed"][0]
    fps = [fingerprint(n, c, f, x, px) for n, c, f, x, px in
           zip(names, full["codes"], full["features"], full["latents"], full["pixels"])]
    return VerifyResult(not mismatches, fps, mismatches, environment(tok))


def compare_fingerprints(a: list[dict], b: list[dict], label_a="model", label_b="against") -> list[str]:
    diffs = []
    for fa, fb in zip(a, b):
        for k in fa:
            if fa[k] != fb.get(k):
                diffs.append(f"{fa['image']}: {k}: {label_a} {fa[k]!r} != {label_b} {fb.get(k)!r}")
    if len(a) != len(b):
        diffs.append(f"{len(a)} images vs {len(b)}")
    return diffs
