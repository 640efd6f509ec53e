"""Lossless checks of a model, and fingerprints that identify what it computes.

First the files: every part a viq folder lists must have the sha256 its config.json recorded, and
every tensor the right dtype and finite values (a problem here is a failed check, exit 1, naming the
part). Then one model: the full forward path (ViT -> head -> FSQ values -> features -> drawer in one
pass, no indices) and the split path (stored codes first, then embed / draw from the codes alone
through the codebook) must agree bit for bit, with all images packed and with each image alone. The
attention pool and the pixel decoder, when shipped, are run too and fingerprinted. Two models
(``against``): identical fingerprints.
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


#: the part each fingerprint entry (and each compared output) exercises, to name it in a mismatch.
PART_OF_KEY = {"codes": "encoder", "grid": "encoder", "codes_sum": "encoder", "distinct_codes": "encoder",
               "codes_sha256": "encoder", "features": "decoder", "features_abs_sum": "decoder",
               "latents": "drawer", "latent_abs_sum": "drawer", "pixels": "drawer", "pixels_sum": "drawer",
               "pixels_sha256": "drawer", "pooled": "pool", "pooled_abs_sum": "pool", "pooled_sha256": "pool",
               "pixel_decoder": "pixel_decoder", "pixel_decoder_sha256": "pixel_decoder"}


def fingerprint(name: str, codes: torch.Tensor, feats: torch.Tensor, latent: torch.Tensor, pixels: torch.Tensor,
                pooled: torch.Tensor | None = None, decoded: torch.Tensor | None = None) -> dict:
    c = codes.to(torch.int64)
    out = {"image": name, "grid": [int(c.shape[0]), int(c.shape[1])], "codes_sum": int(c.sum()),
           "distinct_codes": int(torch.unique(c).numel()), "codes_sha256": _sha(c),
           "features_abs_sum": float(feats.double().abs().sum()), "latent_abs_sum": float(latent.double().abs().sum()),
           "pixels_sum": int(pixels.to(torch.int64).sum()), "pixels_sha256": _sha(pixels)}
    if pooled is not None:
        out.update(pooled_abs_sum=float(pooled.double().abs().sum()), pooled_sha256=_sha(pooled.float()))
    if decoded is not None:
        out["pixel_decoder_sha256"] = _sha(decoded)
    return out


def environment(tok: ViQTokenizer) -> dict:
    from viq.weights.save import versions

    return {"device": str(tok.device), "dtype": str(tok.dtype).replace("torch.", ""), **versions()}


@dataclass
class VerifyResult:
    ok: bool
    fingerprints: list[dict]
    mismatches: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    #: part -> sha256 of its tensors as loaded (names, shapes, bytes in the compute dtype)
    weights: dict = field(default_factory=dict)

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
    out = {"codes": [i.reshape(h, w, slots).cpu() for i, (h, w) in zip(packing.split(indices, slots), packing.grids)],
           "features": [f.cpu() for f in packing.split(feats)], "latents": [x.cpu() for x in latents],
           "pixels": [model.decode_latent(x).cpu() for x in latents]}
    if "pool" in model.parts and getattr(model.vit, "with_pool", False):
        out["pooled"] = [model.vit.pool(t).cpu() for t in packing.split(tokens)]
    if "pixel_decoder" in model.parts:
        out["pixel_decoder"] = [x.cpu() for x in model.decode_pixels(feats, packing)]
    return out


@torch.inference_mode()
def _split_path(tok, pixels):
    """Images -> codes (stored form) -> embed / draw from the codes alone."""
    codes = tok.encode_pixels(pixels)
    out = {"codes": codes, "features": tok.embed(codes), "latents": [x.cpu() for x in tok.latents(codes)],
           "pixels": tok.reconstruct(codes)}
    if "pixel_decoder" in tok.model.parts:
        out["pixel_decoder"] = tok.reconstruct(codes, decoder="pixel")
    return out


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
        for key in ("codes", "features", "latents", "pixels", "pixel_decoder"):
            for name, a, b in zip(names, full.get(key, []), split.get(key, [])):
                if a.shape != b.shape or not torch.equal(a, b):
                    diff = "shape" if a.shape != b.shape else f"max |diff| {(a.double() - b.double()).abs().max():.3g}"
                    mismatches.append(f"{name}: {key} ({PART_OF_KEY[key]}): full path != split path ({mode}; {diff})")
        for key in ("features", "latents", "pooled"):
            for name, a in zip(names, full.get(key, [])):
                if not bool(torch.isfinite(a).all()):
                    mismatches.append(f"{name}: {key} ({PART_OF_KEY[key]}) hold NaN/inf ({mode})")
    packed, single = runs["packed"][0], runs["one by one"][0]
    for name, a, b in zip(names, packed["codes"], single["codes"]):
        if not torch.equal(a, b):
            mismatches.append(f"{name}: codes (encoder) differ between packed and one-by-one encoding")
    for key in ("features", "latents", "pooled"):
        for name, a, b in zip(names, packed.get(key, []), single.get(key, [])):
            rel = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
            if rel > feature_rtol:
                mismatches.append(f"{name}: {key} ({PART_OF_KEY[key]}) packed vs one-by-one differ by {rel:.3g} "
                                  f"(> {feature_rtol:g})")
    for name, a, b in zip(names, packed["pixels"], single["pixels"]):
        d = (a.int() - b.int()).abs().max().item()
        if d > 1:
            mismatches.append(f"{name}: pixels packed vs one-by-one differ by {d} grey levels (> 1)")
    full = runs["packed"][0]
    n = len(names)
    fps = [fingerprint(nm, c, f, x, px, po, pd) for nm, c, f, x, px, po, pd in
           zip(names, full["codes"], full["features"], full["latents"], full["pixels"],
               full.get("pooled", [None] * n), full.get("pixel_decoder", [None] * n))]
    return VerifyResult(not mismatches, fps, mismatches, environment(tok), weights_digests(tok))


def weights_digests(tok: ViQTokenizer) -> dict[str, str]:
    """One sha256 per loaded part over its tensors as the model holds them: two sources loaded with
    the same dtype compare bit for bit (a low bit flipped in a .pth file, which has no recorded
    digest, changes no code on a few photos but changes this)."""
    from viq.model.viq_model import part_of

    hashes: dict[str, "hashlib._Hash"] = {}
    state = tok.model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h = hashes.setdefault(part_of(key), hashlib.sha256())
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {p: h.hexdigest() for p, h in hashes.items()}


def compare_weights(a: dict, b: dict, label_a="model", label_b="against") -> list[str]:
    """Parts both sources hold must be equal tensor for tensor (as loaded)."""
    return [f"weights of the {p} part differ: {label_a} {a[p][:12]}... != {label_b} {b[p][:12]}..."
            for p in a if p in b and a[p] != b[p]]


def compare_fingerprints(a: list[dict], b: list[dict], label_a="model", label_b="against") -> list[str]:
    """Entries both models computed must be equal (a part only one of them ships is not compared).
    A side without fingerprints failed to load: that failure is already reported."""
    if not a or not b:
        return []
    diffs = []
    for fa, fb in zip(a, b):
        for k in fa:
            if k in fb and fa[k] != fb[k]:
                part = f" ({PART_OF_KEY[k]})" if k in PART_OF_KEY else ""
                diffs.append(f"{fa['image']}: {k}{part}: {label_a} {fa[k]!r} != {label_b} {fb[k]!r}")
    if len(a) != len(b):
        diffs.append(f"{len(a)} images vs {len(b)}")
    return diffs


def verify_source(source, named_pixels: list[tuple[str, torch.Tensor]], device=None, dtype=None,
                  config=None) -> VerifyResult:
    """Check the files of ``source`` (digests, dtypes, finite values), then the model itself.

    A path that does not exist or holds no weights at all is a usage error (raised); anything wrong
    with the weights found there is a failed check, returned as mismatches naming the part.
    """
    from viq.errors import ConfigError, WeightsError
    from viq.tokenizer import load_tokenizer, resolve_device, resolve_dtype
    from viq.weights.formats import available_parts, find_reference_files, is_viq_dir, read_viq_config
    from viq.weights.integrity import folder_problems
    from viq.weights.save import versions

    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    viq_dir = is_viq_dir(path)
    if not viq_dir and not path.is_file():
        find_reference_files(path)  # raises (usage) when the folder holds no weights at all
    dev = resolve_device(device)
    env = {"device": dev, "dtype": str(resolve_dtype(dtype, dev)).replace("torch.", ""), **versions()}
    if viq_dir:
        problems = folder_problems(path, read_viq_config(path).get("parts") or {})
        if problems:
            return VerifyResult(False, [], problems, env)
    parts = tuple(dict.fromkeys(("encoder", "decoder", "drawer") + available_parts(path)))
    try:
        tok = load_tokenizer(path, parts=parts, device=device, dtype=dtype, config=config)
    except WeightsError as exc:
        return VerifyResult(False, [], [str(exc)], env)
    return verify_model(tok, named_pixels)
