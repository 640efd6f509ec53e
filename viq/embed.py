"""Codes -> LLM-ready features on disk, streamed: bounded memory, resumable, float32 or bfloat16.

Output is either a folder of shards (``--out feats/``) or one ``.safetensors`` file
(``--out feats.safetensors``). Shards (``features-000000.safetensors``) hold one (h*w, C) tensor per
id, with the grids ``{id: [h, w]}`` in their metadata; a shard is written when its features reach
``max_shard_bytes`` (or the ids run out), under a temp name, then renamed. A rerun reads the
shards' metadata, skips every id already written and numbers new shards after the old ones, so a
killed run resumes. ``index.json`` (id -> shard file) is written last. For one file the shards are
staged in ``<file>.parts/`` and then copied, tensor by tensor, into a single safetensors file
(header first, so nothing is held in memory), after which the parts are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from viq.errors import ConfigError, StoreError
from viq.packing import batches_by_budget
from viq.store import CodeStore
from viq.tokenizer import ViQTokenizer
from viq.weights.io import publish, write_json, write_safetensors

FORMAT = "viq-features v1"
INDEX = "index.json"
DEFAULT_SHARD_BYTES = 512 << 20
_SHARD_RE = re.compile(r"^features-(\d{6,})\.safetensors$")
_DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16")}


def feature_dtype(name) -> str:
    """``float32`` / ``bfloat16`` (``fp32`` / ``bf16`` accepted)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}
    key = str(name).replace("torch.", "")
    if key not in aliases:
        raise ConfigError(f"feature dtype {name!r}: use float32 or bfloat16")
    return aliases[key]


def _done_ids(folder: Path, identity: dict) -> tuple[dict, int]:
    """(id -> shard file of every id already written, next shard index); checks they match ``identity``."""
    from safetensors import safe_open

    done, top = {}, -1
    if not folder.is_dir():
        return done, 0
    for p in sorted(folder.iterdir()):
        m = _SHARD_RE.match(p.name)
        if not m:
            continue
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # a torn file cannot exist (temp + rename), but a foreign one can
            raise StoreError(f"{p}: unreadable feature shard ({exc}); delete it and run embed again") from None
        have = {k: meta.get(k) for k in identity}
        if have != identity:
            diff = ", ".join(f"{k}: {have[k]} != {identity[k]}" for k in identity if have[k] != identity[k])
            raise StoreError(f"{folder} holds features made differently ({diff}); use another --out or delete it")
        for id_ in json.loads(meta.get("grids", "{}")):
            done[id_] = p.name
        top = max(top, int(m.group(1)))
    return done, top + 1


def embed_store(store: CodeStore, tok: ViQTokenizer, out, ids: Sequence[str] | None = None,
                token_budget: int = 16384, progress: Callable[[int], None] | None = None,
                dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Features of ``ids`` (default: all) into ``out`` (a shard folder, or one ``.safetensors`` file)."""
    from viq.decode import check_model_matches, select_ids

    dtype = feature_dtype(dtype)
    torch_dtype = _DTYPES[dtype][0]
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    check_model_matches(store, tok)
    chosen = select_ids(store, ids)
    out = Path(out)
    single = out.suffix == ".safetensors"
    folder = out.with_name(out.name + ".parts") if single else out
    if not single and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for feature shards or a name ending in .safetensors")
    model = store.manifest.get("model") or {}
    identity = {"format": FORMAT, "model": str(tok.config.name), "dtype": dtype,
                "store_fingerprint": str(model.get("fingerprint"))}
    if single and not folder.exists() and _complete(out, identity, chosen):  # a finished run: nothing to do
        if progress:
            progress(len(chosen))
        return {"out": str(out), "images": len(chosen), "bytes": out.stat().st_size,
                "dim": int(tok.config.vit.width), "dtype": dtype, "resumed": len(chosen)}
    done, index = _done_ids(folder, identity)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(".features-*.tmp"):
        p.unlink(missing_ok=True)

    todo = [i for i in chosen if i not in done]
    if progress and len(chosen) > len(todo):
        progress(len(chosen) - len(todo))
    pending: dict = {}
    grids: dict = {}
    size = 0

    def flush():
        nonlocal pending, grids, size, index
        if not pending:
            return
        name = f"features-{index:06d}.safetensors"
        write_safetensors(pending, folder / name, metadata={**identity, "grids": json.dumps(grids)})
        for i in pending:
            done[i] = name
        index += 1
        pending, grids, size = {}, {}, 0

    # Only h and w are needed to batch: records are read per batch, so memory stays bounded.
    for group in _batches(store, todo, token_budget):
        recs = [store.get(i) for i in group]
        feats = tok.embed([torch.from_numpy(r.codes) for r in recs])
        for r, f in zip(recs, feats):
            t = f.to(torch_dtype).contiguous()
            pending[r.id], grids[r.id] = t, [r.h, r.w]
            size += t.numel() * t.element_size()
            if size >= max_shard_bytes:
                flush()
        if progress:
            progress(len(recs))
    flush()

    dim = int(tok.config.vit.width)
    wanted = {i: done[i] for i in chosen}
    write_json({**identity, "dim": dim, "images": len(wanted), "files": sorted(set(wanted.values())),
                "ids": wanted}, folder / INDEX)
    nbytes = sum((folder / f).stat().st_size for f in set(wanted.values()))
    if single:
        nbytes = merge_shards(folder, out, chosen, wanted, identity)
        shutil.rmtree(folder)
    return {"out": str(out), "images": len(chosen), "bytes": nbytes, "dim": dim, "dtype": dtype,
            "resumed": len(chosen) - len(todo)}


def _batches(store: CodeStore, ids: list, token_budget: int):
    """Groups of ids of at most ``token_budget`` patches, reading a bounded window of records."""
    window = 4096
    for start in range(0, len(ids), window):
        part = ids[start:start + window]
        sizes = []
        for i in part:
            r = store.get(i)
            sizes.append(r.h * r.w)
        for group in batches_by_budget(sizes, token_budget):
            yield [part[k] for k in group]


def _complete(out: Path, identity: dict, ids: Sequence[str]) -> bool:
    from safetensors import safe_open

    if not out.is_file():
        return False
    try:
        with safe_open(str(out), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return all(meta.get(k) == v for k, v in identity.items()) and set(ids) <= set(json.loads(meta.get("grids", "{}")))


def merge_shards(folder: Path, out: Path, ids: Sequence[str], where: dict, identity: dict) -> int:
    """One safetensors file from the shards, written header first and tensor by tensor."""
    from safetensors import safe_open

    header, grids, offset = {}, {}, 0
    for i in ids:
        with safe_open(str(folder / where[i]), "pt") as f:
            sl = f.get_slice(i)
            shape, dt = list(sl.get_shape()), sl.get_dtype()
            grids[i] = json.loads(f.metadata()["grids"])[i]
        nbytes = (2 if dt == "BF16" else 4) * shape[0] * shape[1]
        header[i] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {**identity, "grids": json.dumps(grids)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as w:
            w.write(struct.pack("<Q", len(raw)))
            w.write(raw)
            for i in ids:
                with safe_open(str(folder / where[i]), "pt") as f:
                    t = f.get_tensor(i).contiguous()
                w.write(t.view(torch.uint8).numpy().tobytes())
        publish(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out.stat().st_size


def read_features(out) -> dict:
    """id -> (tensor, (h, w)) for a shard folder or a single file (small outputs; tests, inspection)."""
    from safetensors import safe_open

    out = Path(out)
    files = [out] if out.is_file() else sorted(p for p in out.iterdir() if _SHARD_RE.match(p.name))
    result = {}
    for p in files:
        with safe_open(str(p), "pt") as f:
            grids = json.loads((f.metadata() or {}).get("grids", "{}"))
            for k in f.keys():
                result[k] = (f.get_tensor(k), tuple(grids[k]))
    return result
