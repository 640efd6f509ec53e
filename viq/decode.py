"""From a code store back to features or pixels, with the model the store was made with.

Decoding codes with a different model gives plausible-looking nonsense, so a model whose FSQ
levels or decoder fingerprint differ from the store's manifest is refused.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import torch

from viq.errors import ConfigError, StoreError
from viq.packing import batches_by_budget
from viq.store import CodeStore
from viq.weights.io import publish
from viq.tokenizer import ViQTokenizer


def store_model_source(store: CodeStore) -> str | None:
    return (store.manifest.get("model") or {}).get("source")


def check_model_matches(store: CodeStore, tok: ViQTokenizer) -> None:
    info = store.manifest.get("model") or {}
    if list(info.get("levels") or []) != tok.levels:
        raise StoreError(f"{store.root}: codes were made with FSQ levels {info.get('levels')}, the model has "
                         f"{tok.levels}; pass the model the store was encoded with (--model)")
    want = info.get("decoder_fingerprint")
    have = (tok.report.fingerprints if tok.report else {}).get("decoder")
    if want and have and want != have:
        raise StoreError(f"{store.root}: codes were made with another model (decoder fingerprint "
                         f"{want[:12]}... != {have[:12]}...); pass the model the store was encoded with (--model)")


def select_ids(store: CodeStore, ids: Sequence[str] | None) -> list[str]:
    if not ids:
        return store.ids()
    missing = [i for i in ids if i not in store]
    if missing:
        raise ConfigError(f"ids not in {store.root}: {', '.join(missing[:10])}")
    return list(ids)


def png_names(ids: Sequence[str]) -> dict[str, str]:
    """id -> relative PNG path: the id with its extension replaced by .png, kept inside the folder."""
    def safe(i: str) -> str:
        parts = [p for p in PurePosixPath(i.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
        return "/".join(parts) or "image"

    names = {i: str(PurePosixPath(safe(i)).with_suffix(".png")) for i in ids}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    # two ids that differ only by extension keep their full id to stay distinct
    return {i: (n if counts[n] == 1 else safe(i) + ".png") for i, n in names.items()}


def write_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(img.numpy()).save(tmp, format="PNG")
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class ReconstructSummary:
    out: str
    written: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


def reconstruct_store(store: CodeStore, tok: ViQTokenizer, out_dir, ids: Sequence[str] | None = None,
                      crop: bool = True, overwrite: bool = False, token_budget: int = 16384,
                      progress: Callable[[int], None] | None = None, decoder: str = "vae") -> ReconstructSummary:
    """Write one PNG per id. ``crop`` cuts the patch padding away (the reference keeps it)."""
    import time

    t0 = time.perf_counter()
    check_model_matches(store, tok)
    out = Path(out_dir)
    chosen = select_ids(store, ids)
    names = png_names(chosen)
    summary = ReconstructSummary(str(out))
    todo = []
    for i in chosen:
        if not overwrite and (out / names[i]).exists():
            summary.skipped += 1
            if progress:
                progress(1)
        else:
            todo.append(i)
    records = [store.get(i) for i in todo]
    for group in batches_by_budget([r.h * r.w for r in records], token_budget):
        recs = [records[k] for k in group]
        images = tok.reconstruct([torch.from_numpy(r.codes) for r in recs], decoder=decoder)
        for r, img in zip(recs, images):
            if crop:
                img = img[: r.height, : r.width]
            path = out / names[r.id]
            write_png(img, path)
            summary.written.append(str(path))
        if progress:
            progress(len(recs))
    summary.seconds = time.perf_counter() - t0
    return summary


def embed_store(store: CodeStore, tok: ViQTokenizer, out_file, ids: Sequence[str] | None = None,
                token_budget: int = 16384, progress: Callable[[int], None] | None = None) -> dict:
    """LLM-ready features, one safetensors entry per id ((h * w, C) float32); grids in the metadata."""
    import json

    from viq.weights.io import write_safetensors

    check_model_matches(store, tok)
    chosen = select_ids(store, ids)
    records = [store.get(i) for i in chosen]
    tensors, grids = {}, {}
    for group in batches_by_budget([r.h * r.w for r in records], token_budget):
        recs = [records[k] for k in group]
        feats = tok.embed([torch.from_numpy(r.codes) for r in recs])
        for r, f in zip(recs, feats):
            tensors[r.id] = f.float()
            grids[r.id] = [r.h, r.w]
        if progress:
            progress(len(recs))
    nbytes = write_safetensors(tensors, out_file, metadata={"grids": json.dumps(grids),
                                                             "model": str(tok.config.name)})
    return {"out": str(out_file), "images": len(tensors), "bytes": nbytes,
            "dim": tok.config.vit.width}
