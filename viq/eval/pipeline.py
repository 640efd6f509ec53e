"""Evaluate a tokenizer end to end: images (or a code store) -> codes -> reconstructions -> metrics.

The originals are the images exactly as the tokenizer saw them (after the resize policy, before
the patch padding); reconstructions are cropped to that size before comparing.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from viq.errors import ImageError
from viq.eval.report import evaluate, image_grid
from viq.images import Preprocessor, load_rgb, parse_policy, to_pixels
from viq.packing import batches_by_budget, patch_grid
from viq.sources import Source, SourceReader
from viq.sources.base import absolute
from viq.sources.relocate import Relocator
from viq.tokenizer import ViQTokenizer


def _finite(obj):
    """inf/nan -> None so the result is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def evaluate_sources(tok: ViQTokenizer, sources: Sequence, policy: str = "native", decoder: str = "vae",
                     perceptual=None, fid_net=None, grid_path=None, token_budget: int = 16384,
                     progress: Callable[[int], None] | None = None, reader: SourceReader | None = None) -> dict:
    """Encode and reconstruct ``sources`` in memory, then measure. Unreadable images are listed, not fatal.

    ``sources`` are ``viq.sources.Source`` objects (from ``collect_sources``: files, tar members,
    Parquet rows, LLaVA images), read through the same ``SourceReader`` as encode, or plain paths.
    """
    prep = Preprocessor(parse_policy(policy))
    reader = reader or SourceReader()
    originals, pixels, failures, names = [], [], [], []
    for s in sources:
        src = s if isinstance(s, Source) else Source(Path(s).name, absolute(s))
        try:
            img = prep.policy.apply(load_rgb(reader.read(src), name=src.name))
        except ImageError as exc:
            failures.append({"source": src.name, "reason": str(exc)})
            if progress:
                progress(1)
            continue
        originals.append(np.array(img))
        pixels.append(to_pixels(img))
        names.append(src.id)
    counts = [math.prod(patch_grid(px.shape[2], px.shape[1], tok.patch)) for px in pixels]
    codes, recons = [], []
    for group in batches_by_budget(counts, token_budget) if pixels else []:
        c = tok.encode_pixels([pixels[i] for i in group])
        codes += c
        recons += [r.numpy() for r in tok.reconstruct(c, decoder=decoder)]
        if progress:
            progress(len(group))
    return _finish(tok, originals, recons, codes, names, failures, decoder, policy, perceptual, fid_net, grid_path)


def evaluate_store(tok: ViQTokenizer, store, decoder: str = "vae", perceptual=None, fid_net=None, grid_path=None,
                   ids=None, progress: Callable[[int], None] | None = None) -> dict:
    """Reconstruct a code store's images and compare with their sources (re-read and re-preprocessed)."""
    from viq.decode import check_model_matches, select_ids

    check_model_matches(store, tok)
    policy = parse_policy(store.manifest.get("preprocess", "native"))
    originals, recons, codes, names, failures = [], [], [], [], []
    reader, find = SourceReader(), Relocator()  # a tar member or table row is found again by its name
    for i in select_ids(store, ids):
        rec = store.get(i)
        img, reason = _original(rec, i, reader, find, policy)
        if img is None:
            failures.append({"source": rec.source, "reason": reason})
            if progress:
                progress(1)
            continue
        c = torch.from_numpy(rec.codes)
        originals.append(img)
        codes.append(c)
        recons.append(tok.reconstruct([c], decoder=decoder)[0].numpy())
        names.append(i)
        if progress:
            progress(1)
    return _finish(tok, originals, recons, codes, names, failures, decoder, store.manifest.get("preprocess"),
                   perceptual, fid_net, grid_path)


def _original(rec, id, reader: SourceReader, find: Relocator, policy):
    """(the image a store row was encoded from, None), or (None, why not) when unreadable or changed."""
    try:
        data = reader.read(find.find(rec.source, id))
        img = np.array(policy.apply(load_rgb(data, name=rec.source)))
    except ImageError as exc:
        return None, f"original not readable: {exc}"
    if hashlib.sha256(data).hexdigest() != rec.sha256 or img.shape[:2] != (rec.height, rec.width):
        return None, f"{rec.source}: the source changed since it was encoded (its sha256 differs)"
    return img, None


def _finish(tok, originals, recons, codes, names, failures, decoder, policy, perceptual, fid_net, grid_path):
    result = {"decoder": decoder, "preprocess": policy, "model": tok.config.name, "failures": failures}
    if originals:
        metrics = evaluate(originals, recons, codes, tok.codebook_size, perceptual=perceptual, fid_net=fid_net,
                           patch=tok.patch, slots=tok.config.head.slots)
        for row, name in zip(metrics["per_image"], names):
            row["image"] = name
        result.update(metrics)
        if grid_path:
            result["grid"] = str(image_grid(originals, recons, grid_path))
    else:
        result["images"] = 0
    return _finite(result)
