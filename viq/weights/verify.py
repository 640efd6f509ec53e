"""Lossless checks of a model, and fingerprints that identify what it computes.

One model: the full forward path (all images packed: ViT -> head -> indices -> features -> drawer)
and the split path (codes first, then embed / draw, packed and one image at a time) must agree bit
for bit. Two models (``against``): identical fingerprints on the same images.
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
def verify_model(tok: ViQTokenizer, named_pixels: list[tuple[str, torch.Tensor]]) -> VerifyResult:
    model = tok.model
    names = [n for n, _ in named_pixels]
    pixels = [p.to(tok.device, tok.dtype) for _, p in named_pixels]
    slots = tok.config.head.slots
    # 1. full forward path, everything packed
    indices, packing = model.encode(pixels)
    feats = model.embed(indices)
    latents = model.draw_latents(feats, packing)
    full = {"codes": [i.reshape(h, w, slots).cpu() for i, (h, w) in zip(packing.split(indices, slots), packing.grids)],
            "features": [f.cpu() for f in packing.split(feats)], "latents": [x.cpu() for x in latents],
            "pixels": [model.decode_latent(x).cpu() for x in latents]}
    # 2. split path, packed: codes first, then embed and draw from the codes
    codes = tok.encode_pixels(pixels)
    packed = {"codes": codes, "features": tok.embed(codes), "latents": [x.cpu() for x in tok.latents(codes)]}
    packed["pixels"] = tok.reconstruct(codes)
    # 3. split path, one image at a time
    single = {"codes": [], "features": [], "latents": [], "pixels": []}
    for p in pixels:
        c = tok.encode_pixels([p])
        single["codes"] += c
        single["features"] += tok.embed(c)
        single["latents"] += [x.cpu() for x in tok.latents(c)]
        single["pixels"] += tok.reconstruct(c)
    mismatches = []
    for label, other in (("split path (packed)", packed), ("split path (one by one)", single)):
        for key in ("codes", "features", "latents", "pixels"):
            for name, a, b in zip(names, full[key], other[key]):
                if a.shape != b.shape or not torch.equal(a, b):
                    diff = "shape" if a.shape != b.shape else f"max |diff| {(a.double() - b.double()).abs().max():.3g}"
                    mismatches.append(f"{name}: {key} of the full forward path != {label} ({diff})")
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
