"""Checks on code-store rows: names Parquet can hold, a digest per row, what makes a row damaged.

Why: a store is read back by other tools and other people; a flipped byte, a row appended by hand
or a code past the codebook must be found and named (shard, row), never decoded into plausible
nonsense. ``viq.store`` decides what a damaged row means (it never wins; see its docstring).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: the per-row digest column; absent from shards written before it existed (not digest-checked).
DIGEST = "digest"
#: every other column, in schema order (``codes`` last).
COLUMNS = ("id", "source", "sha256", "preprocess", "width", "height", "h", "w", "codes")


def clean_text(text: str) -> str:
    """A name as the store keeps it: valid UTF-8 unchanged; each byte that is not written ``\\xNN``.

    File names on Linux are bytes; Python hands undecodable ones over as lone surrogates, which
    Parquet (UTF-8 only) cannot store.
    """
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def row_digest(id: str, source: str, sha256: str, preprocess: str, width: int, height: int, h: int, w: int,
               flat: np.ndarray) -> str:
    """sha256 of every field of a row and its codes (little-endian, as stored)."""
    head = json.dumps([id, source, sha256, preprocess, int(width), int(height), int(h), int(w)], ensure_ascii=True)
    digest = hashlib.sha256(head.encode("ascii"))
    flat = np.asarray(flat)
    digest.update(np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


class RowGroup:
    """One decoded row group: columns as Python lists, codes as flat values + offsets."""

    def __init__(self, table: pa.Table):
        names = table.column_names
        self.cols = {c: table.column(c).to_pylist() for c in COLUMNS[:-1] + (DIGEST,) if c in names}
        codes = table.column("codes").combine_chunks()
        self.offsets = codes.offsets.to_numpy()
        self.values = codes.values.to_numpy(zero_copy_only=False)


def row_problem(group: RowGroup, i: int, codebook_size: int | None) -> str | None:
    """Why row ``i`` of a decoded group cannot be trusted, or None."""
    c = group.cols
    h, w, width, height = c["h"][i], c["w"][i], c["width"][i], c["height"][i]
    if None in (h, w, width, height, c["id"][i]) or min(h, w, width, height) < 1:
        return f"impossible grid or size (h={h}, w={w}, width={width}, height={height})"
    flat = group.values[group.offsets[i]:group.offsets[i + 1]]
    if flat.size != 4 * h * w:
        return f"{flat.size} codes for a {h}x{w} grid"
    if codebook_size is not None and flat.size and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        return f"codes outside [0, {codebook_size}) (min {int(flat.min())}, max {int(flat.max())})"
    if DIGEST in c:
        want = c[DIGEST][i]
        have = row_digest(c["id"][i], c["source"][i], c["sha256"][i], c["preprocess"][i], width, height, h, w, flat)
        if want != have:
            return "digest mismatch: the row was changed or damaged"
    return None


def codes_out_of_range(pf: pq.ParquetFile, g: int, codebook_size: int | None) -> bool:
    """From the row group's statistics alone (no data read): may it hold a code out of range?"""
    if codebook_size is None:
        return False
    rg = pf.metadata.row_group(g)
    for j in range(rg.num_columns):
        col = rg.column(j)
        if col.path_in_schema.startswith("codes."):
            st = col.statistics
            if st is None or not st.has_min_max:
                return True  # unknown: read it
            return int(st.min) < 0 or int(st.max) >= codebook_size
    return True
