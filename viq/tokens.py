"""Codes as tokens of an autoregressive model's vocabulary (the Emu3 / LlamaGen / Chameleon way).

One image becomes one flat sequence; the codebook is shifted by ``offset`` into the LLM's ids::

    BOI  c(0,0,0) c(0,0,1) c(0,0,2) c(0,0,3)  c(0,1,0) ...  c(0,w-1,3)  EOL
         c(1,0,0) ...                                        c(1,w-1,3)  EOL
         ...                                                             EOL  EOI

``c(r, q, j)`` (slot j of patch (r, q)) is token ``offset + code``; with K = the codebook size,
``BOI = offset + K``, ``EOI = offset + K + 1`` and ``EOL`` (end of a patch row) ``= offset + K + 2``.
Every row ends in EOL, so the grid (h rows, w patches of 4 slots) is rebuilt from the tokens alone:
``tokens_to_codes`` inverts ``codes_to_tokens`` exactly. In a text tokenizer these ids are the
added tokens ``<viq_0>`` ... ``<viq_{K-1}>``, ``<viq_boi>``, ``<viq_eoi>``, ``<viq_eol>``
(``add_to_tokenizer``), so ``offset`` is the tokenizer's length before they are added.

A store's tokens are written as Parquet shards (``tokens-000000.parquet``: ``id``, ``h``, ``w``,
``tokens`` list<int32>) plus ``tokens.json`` with the layout; ``write_token_shards`` resumes after a
kill (each shard is written under a temp name and renamed when complete; a rerun skips them).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from viq.errors import ConfigError, StoreError

FORMAT = "viq-tokens v1"
LAYOUT_FILE = "tokens.json"
SPECIALS = ("boi", "eoi", "eol")


@dataclass(frozen=True)
class TokenLayout:
    """Where the ViQ tokens sit in an LLM vocabulary: ``offset`` .. ``offset + codebook_size + 2``."""

    offset: int
    codebook_size: int
    slots: int = 4

    def __post_init__(self):
        if self.offset < 0 or self.codebook_size < 1 or self.slots < 1:
            raise ConfigError(f"token layout needs offset >= 0, codebook_size >= 1 and slots >= 1, got {self}")

    @property
    def boi(self) -> int:
        return self.offset + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.offset + self.codebook_size + 1

    @property
    def eol(self) -> int:
        return self.offset + self.codebook_size + 2

    @property
    def vocab_end(self) -> int:
        """One past the last id used: the LLM's embedding table needs at least this many rows."""
        return self.offset + self.codebook_size + len(SPECIALS)

    def token_names(self) -> list[str]:
        """The added-token strings, in id order from ``offset``."""
        return [f"<viq_{i}>" for i in range(self.codebook_size)] + [f"<viq_{s}>" for s in SPECIALS]

    def sequence_length(self, h: int, w: int) -> int:
        return h * (w * self.slots + 1) + 2

    def to_dict(self) -> dict:
        return {**asdict(self), "boi": self.boi, "eoi": self.eoi, "eol": self.eol, "vocab_end": self.vocab_end}


def codes_to_tokens(codes, layout: TokenLayout) -> np.ndarray:
    """(h, w, slots) codes -> int64 token ids (see the module docstring for the order)."""
    c = np.asarray(codes)
    if c.ndim != 3 or c.shape[2] != layout.slots or c.shape[0] < 1 or c.shape[1] < 1:
        raise ConfigError(f"codes must have shape (h, w, {layout.slots}) with h, w >= 1, got {c.shape}")
    c = c.astype(np.int64)
    if c.min() < 0 or c.max() >= layout.codebook_size:
        raise ConfigError(f"codes range [{c.min()}, {c.max()}] is outside [0, {layout.codebook_size})")
    h, w, s = c.shape
    rows = np.empty((h, w * s + 1), dtype=np.int64)
    rows[:, :-1] = c.reshape(h, w * s) + layout.offset
    rows[:, -1] = layout.eol
    return np.concatenate([[layout.boi], rows.reshape(-1), [layout.eoi]])


def tokens_to_codes(tokens: Sequence[int], layout: TokenLayout) -> np.ndarray:
    """The exact inverse of ``codes_to_tokens``; ConfigError saying what is wrong otherwise."""
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if t.size < 2 or t[0] != layout.boi or t[-1] != layout.eoi:
        raise ConfigError(f"an image's tokens start with BOI ({layout.boi}) and end with EOI ({layout.eoi})")
    body = t[1:-1]
    ends = np.flatnonzero(body == layout.eol)
    if ends.size == 0 or ends[-1] != body.size - 1:
        raise ConfigError("an image's rows each end with EOL; the last token before EOI must be EOL")
    width = int(ends[0])
    h = int(ends.size)
    if width == 0 or width % layout.slots or not np.array_equal(ends, np.arange(1, h + 1) * (width + 1) - 1):
        raise ConfigError(f"rows must all hold the same number of codes, a multiple of {layout.slots}")
    grid = body.reshape(h, width + 1)[:, :-1] - layout.offset
    if grid.min() < 0 or grid.max() >= layout.codebook_size:
        raise ConfigError(f"a code token is outside [{layout.offset}, {layout.offset + layout.codebook_size})")
    return grid.reshape(h, width // layout.slots, layout.slots)


def add_to_tokenizer(tokenizer, codebook_size: int, slots: int = 4) -> TokenLayout:
    """Add the ViQ tokens to a transformers tokenizer; the layout whose ids they got.

    Already added (same names, contiguous) is fine: the same layout comes back. Resize the LLM's
    embeddings to ``len(tokenizer)`` afterwards (``model.resize_token_embeddings``).
    """
    names = TokenLayout(0, codebook_size, slots).token_names()
    first = tokenizer.convert_tokens_to_ids(names[0])
    if first is None or first == getattr(tokenizer, "unk_token_id", None):
        first = len(tokenizer)
        tokenizer.add_tokens(names, special_tokens=False)
    layout = TokenLayout(int(first), codebook_size, slots)
    got = tokenizer.convert_tokens_to_ids(names)
    if list(got) != list(range(layout.offset, layout.vocab_end)):
        raise ConfigError("the tokenizer's <viq_*> tokens are not contiguous ids; add them to a tokenizer "
                          "that has none of them yet")
    return layout


def tokenizer_layout(name_or_path: str, codebook_size: int, save_to=None, slots: int = 4) -> TokenLayout:
    """Load a transformers tokenizer (a folder, or a Hub id found through the HF cache), add the
    ViQ tokens, optionally save the extended tokenizer to ``save_to``; the resulting layout."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # missing files, offline, not a tokenizer: one line, with the reason
        raise ConfigError(f"--tokenizer {name_or_path}: cannot load a tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    layout = add_to_tokenizer(tok, codebook_size, slots)
    if save_to is not None:
        tok.save_pretrained(str(save_to))
    return layout


# ---------------------------------------------------------------------------------------------
# a store's tokens as Parquet shards


def _schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("h", pa.int32()), ("w", pa.int32()), ("tokens", pa.list_(pa.int32()))])


def shard_name(index: int) -> str:
    return f"tokens-{index:06d}.parquet"


def _check_layout(out: Path, want: dict) -> None:
    path = out / LAYOUT_FILE
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e}); delete {out} and run again") from None
        if {k: have.get(k) for k in want} != want:
            raise StoreError(f"{out} holds tokens written with another layout or store ({path}); "
                             "use another --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({"format": FORMAT, **want}, indent=2) + "\n")
    os.replace(tmp, path)


def write_token_shards(store, out_dir, layout: TokenLayout, rows_per_shard: int = 1024,
                       progress: Callable[[int], None] | None = None) -> dict:
    """Every image of a code store as a token sequence, in id order; shards already written are kept."""
    from viq.store import CodeStore

    store = store if isinstance(store, CodeStore) else CodeStore(store)
    if rows_per_shard < 1:
        raise ConfigError(f"rows per shard must be >= 1, got {rows_per_shard}")
    size = int((store.manifest.get("model") or {}).get("codebook_size") or 0)
    if size and size != layout.codebook_size:
        raise ConfigError(f"the store's codebook has {size} codes, the layout {layout.codebook_size}")
    out = Path(out_dir)
    ids = store.ids()
    model = store.manifest.get("model") or {}
    _check_layout(out, {"layout": layout.to_dict(), "store_fingerprint": model.get("fingerprint"),
                        "images": len(ids), "rows_per_shard": rows_per_shard,
                        "ids_digest": _ids_digest(ids)})
    written = kept = 0
    for index, start in enumerate(range(0, len(ids), rows_per_shard)):
        chunk = ids[start:start + rows_per_shard]
        final = out / shard_name(index)
        if final.exists():
            kept += 1
            if progress:
                progress(len(chunk))
            continue
        recs = [store.get(i) for i in chunk]
        seqs = [codes_to_tokens(r.codes, layout).astype(np.int32) for r in recs]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        table = pa.Table.from_arrays(
            [pa.array(chunk, pa.string()), pa.array([r.h for r in recs], pa.int32()),
             pa.array([r.w for r in recs], pa.int32()),
             pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(seqs)))], schema=_schema())
        tmp = out / f".tmp-{uuid.uuid4().hex}"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        written += 1
        if progress:
            progress(len(chunk))
    return {"out": str(out), "images": len(ids), "shards_written": written, "shards_kept": kept,
            **layout.to_dict()}


def _ids_digest(ids: list) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def read_layout(out_dir) -> TokenLayout:
    path = Path(out_dir) / LAYOUT_FILE
    try:
        d = json.loads(path.read_text())["layout"]
        return TokenLayout(d["offset"], d["codebook_size"], d.get("slots", 4))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: not a viq tokens layout ({e})") from None


def iter_token_shards(out_dir) -> Iterator[tuple[str, np.ndarray]]:
    """(id, tokens) of every image in a tokens folder, in id order, one row group at a time."""
    for path in sorted(Path(out_dir).glob("tokens-*.parquet")):
        pf = pq.ParquetFile(path)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=["id", "tokens"])
            col = t.column("tokens").combine_chunks()
            offs, vals = col.offsets.to_numpy(), col.values.to_numpy()
            for k, id_ in enumerate(t.column("id").to_pylist()):
                yield id_, vals[offs[k]:offs[k + 1]].astype(np.int64)
