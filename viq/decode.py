"""From a code store back to features or pixels, with the model the store was made with.

Decoding codes with a different model gives plausible-looking nonsense, so a model whose FSQ
levels or decoder fingerprint differ from the store's manifest is refused.
"""

from __future__ import annotations

import hashlib
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


#: longest file-name component written (bytes); longer ids are shortened and keep a hash of the id.
MAX_NAME_BYTES = 200


def _id_hash(i: str) -> str:
    return hashlib.sha256(i.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _component(part: str) -> str:
    """One path component made writable: control characters (NUL...) replaced, length capped."""
    part = "".join("_" if ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) < 0xE000 else ch for ch in part)
    raw = part.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        part = raw[:MAX_NAME_BYTES - 12].decode("utf-8", "ignore") + "~" + _id_hash(part)
    return part


def _preferred(i: str) -> str:
    """The id as a relative path inside --out, its extension replaced by .png."""
    parts = [_component(p) for p in i.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    name = PurePosixPath(*parts) if parts else PurePosixPath("image")
    stem = name.name[:-len(name.suffix)] if name.suffix and name.name != name.suffix else name.name
    return str(name.with_name(stem + ".png"))


def png_names(ids: Sequence[str]) -> dict[str, str]:
    """id -> relative PNG path, unique per id and always inside the output folder.

    The id with its extension replaced by .png (``cat.jpg`` -> ``cat.png``), no ``..``, no absolute
    paths, no control characters, components no longer than ``MAX_NAME_BYTES``. Ids that would share
    a name (``x.jpg`` / ``x.png``, ``b.png`` / ``./b.png``, also differing only in case) all get a hash
    of the id instead (``x.3f2a9c81d0.png``): which id gets which name never depends on the others'
    order. Pass every id of the store so that names do not depend on the ids chosen for one run.
    """
    preferred = {i: _preferred(i) for i in ids}
    count: dict[str, int] = {}
    for n in preferred.values():
        count[n.casefold()] = count.get(n.casefold(), 0) + 1
    names, used = {}, set()
    for i in sorted(ids):
        n = preferred[i]
        if count[n.casefold()] > 1 or n.casefold() in used:
            base = PurePosixPath(n)
            n = str(base.with_name(f"{base.stem}.{_id_hash(i)}.png"))
            k = 0
            while n.casefold() in used or (n.casefold() in count and n != preferred[i]):
                k += 1
                n = str(base.with_name(f"{base.stem}.{_id_hash(f'{i}#{k}')}.png"))
        used.add(n.casefold())
        names[i] = n
    return names


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
    #: ids that could not be drawn or written: {"id", "reason"}; the others are written regardless.
    failed: list[dict] = field(default_factory=list)


def reconstruct_store(store: CodeStore, tok: ViQTokenizer, out_dir, ids: Sequence[str] | None = None,
                      crop: bool = True, overwrite: bool = False, token_budget: int = 16384,
                      progress: Callable[[int], None] | None = None, decoder: str = "vae") -> ReconstructSummary:
    """Write one PNG per id. ``crop`` cuts the patch padding away (the reference keeps it)."""
    import time

    t0 = time.perf_counter()
    check_model_matches(store, tok)
    out = Path(out_dir)
    chosen = select_ids(store, ids)
    names = png_names(store.ids())  # all ids: a name never depends on which ids one run chose
    summary = ReconstructSummary(str(out))

    def fail(i: str, reason: str) -> None:
        summary.failed.append({"id": i, "reason": reason})
        if progress:
            progress(1)

    todo = []
    for i in chosen:
        if not overwrite and (out / names[i]).exists():
            summary.skipped += 1
            if progress:
                progress(1)
        else:
            todo.append(i)
    records = []
    for i in todo:
        try:
            records.append(store.get(i))
        except StoreError as exc:  # a damaged row: named, the others go on
            fail(i, str(exc))
    root = out.resolve()
    for group in batches_by_budget([r.h * r.w for r in records], token_budget):
        recs = [records[k] for k in group]
        images = tok.reconstruct([torch.from_numpy(r.codes) for r in recs], decoder=decoder)
        for r, img in zip(recs, images):
            if crop:
                img = img[: r.height, : r.width]
            path = out / names[r.id]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.parent.resolve().is_relative_to(root):
                    raise OSError(f"{path.parent} leads outside {out} (a symlink?)")
                write_png(img, path)
            except (OSError, ValueError) as exc:
                summary.failed.append({"id": r.id, "reason": f"{names[r.id]!r}: cannot be written ({exc})"})
                continue
            summary.written.append(str(path))
        if progress:
            progress(len(recs))
    summary.seconds = time.perf_counter() - t0
    return summary

