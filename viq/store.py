"""The code store: FSQ code grids of many images on disk, written by many ranks, read by id.

Layout of a store directory::

    manifest.json                      model identity, preprocessing, counts, shard list
    shard-r{rank:05d}-{index:06d}.parquet   one row per image (plain Parquet: pyarrow / datasets open it)
    failures.jsonl                     {"source", "id", "reason"} per line (merged at finalize)
    failures-r{rank:05d}.jsonl         per-rank failure parts while a run is going on
    .tmp-*                             files being written; never valid, deleted on the next open

Crash safety: a shard is written under a temp name and renamed when complete, so a killed run
leaves only whole shards; the rows it had not flushed are simply encoded again on resume.

Resume and supersede ("newest wins"): a writer numbers its shards from one past the highest index
of any shard already in the store (any rank), so a later run's shards always sort after an earlier
run's. Every row and every failure therefore has an age key: rows ``(shard index, rank, row)``,
failures ``(index of the shard the writer would write next, -1, line)`` and merged failures the
oldest key of all. Per id the newest entry wins: a re-encoded (changed) file replaces its old row,
a later success removes a failure, and a later failure of a changed file removes its stale row.
The reader applies this rule in memory; ``finalize_store`` applies it on disk (rewrites the shards
that hold losing rows, merges failure parts), so a finalized store holds each id exactly once and
Hugging Face ``datasets`` sees no duplicates. One encode run at a time per store.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from viq import __version__
from viq.errors import StoreError

FORMAT = "viq-code-store v1"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
#: Rows per Parquet row group: random access by id reads one group, not a whole shard.
ROW_GROUP_ROWS = 32
#: Model-info keys that must agree for two runs to share a store.
IDENTITY_KEYS = ("fingerprint", "levels", "codebook_size")

_SHARD_RE = re.compile(r"^shard-r(\d{5,})-(\d{6,})\.parquet$")
_PART_RE = re.compile(r"^failures-r(\d{5,})\.jsonl$")
_COLUMNS = ("id", "source", "sha256", "preprocess", "width", "height", "h", "w", "codes")
_MERGED_KEY = -1  # merged failures are older than anything written after the last finalize


def codes_dtype(codebook_size: int) -> np.dtype:
    """Smallest stored dtype for code values in ``[0, codebook_size)``: uint16 when it fits, else int32."""
    if codebook_size < 1:
        raise StoreError(f"codebook_size must be >= 1, got {codebook_size}")
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def shard_schema(codebook_size: int) -> pa.Schema:
    """The Parquet schema of every shard; ``codes`` is the flat (h, w, 4) grid, row-major."""
    value = pa.uint16() if codes_dtype(codebook_size) == np.uint16 else pa.int32()
    return pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("preprocess", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("h", pa.int32()), ("w", pa.int32()),
        ("codes", pa.list_(value)),
    ])


@dataclass
class CodeRecord:
    """One image's codes. ``codes`` is int64 (h, w, 4): ready for embedding lookups, no uint16 pitfalls."""

    id: str
    source: str
    sha256: str
    preprocess: str
    width: int
    height: int
    h: int
    w: int
    codes: np.ndarray


# ---------------------------------------------------------------------------------------------
# small file helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_atomic(path: Path, text: str, tmp_prefix: str) -> None:
    tmp = path.parent / f"{tmp_prefix}{uuid.uuid4().hex}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove_temps(root: Path, prefix: str) -> None:
    for p in root.iterdir():
        if p.name.startswith(prefix) and p.is_file():
            p.unlink(missing_ok=True)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise StoreError(f"{root}: no such code store directory")
    if not path.is_file():
        raise StoreError(f"{root} is not a viq code store (no {MANIFEST}); encode into it with viqctl encode")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: corrupt manifest ({e}); delete the store and encode again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT!r} manifest")
    return manifest


def _identity(model_info: dict) -> dict:
    model = json.loads(json.dumps(model_info))  # tuples -> lists, so comparisons are exact
    return {k: model.get(k) for k in IDENTITY_KEYS}


def _codebook_size(model_info: dict) -> int:
    size = model_info.get("codebook_size")
    if size is None and model_info.get("levels"):
        size = int(np.prod(model_info["levels"]))
    if size is None:
        raise StoreError("model_info needs 'codebook_size' or 'levels' to choose the code dtype")
    return int(size)


# ---------------------------------------------------------------------------------------------
# scanning: every shard and failure record, resolved by "newest wins"


@dataclass
class _Shard:
    path: Path
    rank: int
    index: int
    group_starts: list  # first row of each row group, then the row count


@dataclass
class _Scan:
    shards: list      # [_Shard], sorted by (index, rank)
    rows: dict        # id -> (key, shard position, row, sha256), winners only
    failures: dict    # id -> (key, {"source", "id", "reason"}), winners only
    next_index: int   # first shard index a new writer may use: newer than every row and failure


def _shard_files(root: Path) -> list:
    found = []
    for p in root.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), p))
    return sorted(found)


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: unreadable shard ({e}); delete it and run encode again to redo its images") from e
    missing = [c for c in _COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise StoreError(f"{path}: shard lacks columns {missing}; delete it and run encode again")
    return pf


def _read_failures(path: Path, strict: bool) -> list:
    """Records of one failures file. A part may end in a half line (killed mid-write): skip it."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: unreadable failures file ({e})") from e
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec["id"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            if not strict and n == len(lines) - 1:
                continue
            raise StoreError(f"{path}: line {n + 1} is not a failure record ({e}); fix or delete the line") from e
        out.append(rec)
    return out


def _scan(root: Path) -> _Scan:
    shards, rows = [], {}
    for pos, (index, rank, path) in enumerate(_shard_files(root)):
        pf = _open_shard(path)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        shards.append(_Shard(path, rank, index, starts))
        try:
            table = pf.read(columns=["id", "sha256"])
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"{path}: unreadable shard ({e}); delete it and run encode again") from e
        for row, (id_, sha) in enumerate(zip(table.column("id").to_pylist(), table.column("sha256").to_pylist())):
            key = (index, rank, row)
            if id_ not in rows or rows[id_][0] < key:
                rows[id_] = (key, pos, row, sha)

    failures, order, max_gen = {}, 0, -1
    sources = [(root / FAILURES, None)] if (root / FAILURES).is_file() else []
    sources += sorted((p, int(m.group(1))) for p in root.iterdir() if (m := _PART_RE.match(p.name)))
    for path, rank in sources:
        for rec in _read_failures(path, strict=rank is None):
            order += 1
            gen = _MERGED_KEY if rank is None else int(rec.get("gen", 0))
            max_gen = max(max_gen, gen)
            key = (gen, -1, order)  # rank -1: a row flushed at the same index is newer
            clean = {"source": rec.get("source"), "id": rec["id"], "reason": rec.get("reason")}
            if rec["id"] not in failures or failures[rec["id"]][0] < key:
                failures[rec["id"]] = (key, clean)

    for id_ in list(failures):
        if id_ in rows:
            if rows[id_][0] > failures[id_][0]:
                del failures[id_]
            else:
                del rows[id_]
    # Unmerged failures count too: a killed finalize may have deleted the shard with the top index.
    next_index = max(max((s.index for s in shards), default=-1) + 1, max_gen)
    return _Scan(shards, rows, failures, next_index)


# ---------------------------------------------------------------------------------------------
# writing


class CodeStoreWriter:
    """Appends one rank's rows to a store; safe to kill at any time and to reopen for resume.

    ``model_info`` is the model identity (name, fingerprint, levels, codebook_size, ...), recorded
    in the manifest; a store made by another model or preprocessing policy is refused.
    """

    def __init__(self, root, model_info: dict, preprocess: str, rank: int = 0, world_size: int = 1,
                 rows_per_shard: int = 256):
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} is outside world size {world_size}")
        if rows_per_shard < 1:
            raise StoreError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.root = Path(root)
        self.rank = rank
        self.preprocess = preprocess
        self.rows_per_shard = rows_per_shard
        self.codebook_size = _codebook_size(model_info)
        self._dtype = codes_dtype(self.codebook_size)
        self._schema = shard_schema(self.codebook_size)
        self._tmp = f".tmp-r{rank:05d}-"
        self.added = 0
        self.failed = 0

        self.root.mkdir(parents=True, exist_ok=True)
        _remove_temps(self.root, self._tmp)  # our own leftovers only: other ranks may be writing
        self._open_manifest(dict(model_info))

        scan = _scan(self.root)
        self._finished = {id_: r[3] for id_, r in scan.rows.items()}
        self._next_index = scan.next_index
        self._session: dict = {}  # id -> sha256 of rows added by this writer (flushed or not)
        self._buffer: list = []
        self._failures_file = None

    def _open_manifest(self, model_info: dict) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            foreign = sorted(p.name for p in self.root.iterdir()
                             if not p.name.startswith(".tmp-") and p.name != MANIFEST)
            if foreign and not path.exists():  # re-check: another rank may have just created it
                raise StoreError(f"{self.root} is not empty ({', '.join(foreign[:3])}, ...) and is not a viq "
                                 f"code store; use another --out or an empty directory")
        if path.exists():
            manifest = _read_manifest(self.root)
            old, new = _identity(manifest.get("model", {})), _identity(model_info)
            diffs = [f"{k}: {old[k]!r} != {new[k]!r}" for k in IDENTITY_KEYS if old[k] != new[k]]
            if manifest.get("preprocess") != self.preprocess:
                diffs.append(f"preprocess: {manifest.get('preprocess')!r} != {self.preprocess!r}")
            was, now = manifest.get("model", {}).get("compute_dtype"), model_info.get("compute_dtype")
            if was and now and was != now:  # one store, one precision: bf16 and fp32 codes differ
                diffs.append(f"compute dtype: {was} != {now} (pass --dtype {was} to add to this store)")
            if diffs:
                raise StoreError(f"{self.root} holds codes from another model or preprocessing ({'; '.join(diffs)}); "
                                 f"use another --out or delete that directory")
            return
        now = _now()
        manifest = {
            "format": FORMAT, "model": model_info, "preprocess": self.preprocess,
            "codes_dtype": self._dtype.name, "viq_version": __version__,
            "counts": {"images": 0, "failures": 0, "shards": 0}, "shards": [],
            "finalized": False, "created": now, "updated": now,
        }
        _write_atomic(path, json.dumps(manifest, indent=2) + "\n", self._tmp)

    def finished(self) -> dict:
        """id -> sha256 of every row committed (in any rank's shards) when this writer opened."""
        return dict(self._finished)

    def needs_encoding(self, id: str, sha256: str) -> bool:
        """True unless a row for this id with this source hash is committed or already added here."""
        return self._session.get(id, self._finished.get(id)) != sha256

    def add(self, id: str, source: str, sha256: str, width: int, height: int, codes: np.ndarray) -> None:
        """Queue one image's (h, w, 4) code grid; a shard is written every ``rows_per_shard`` rows."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[2] != 4 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise StoreError(f"{id}: codes must have shape (h, w, 4) with h, w >= 1, got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise StoreError(f"{id}: codes must be integers, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise StoreError(f"{id}: codes range [{lo}, {hi}] is outside [0, {self.codebook_size})")
        h, w = codes.shape[:2]
        self._buffer.append((id, source, sha256, self.preprocess, int(width), int(height), h, w,
                             codes.astype(self._dtype).reshape(-1)))
        self._session[id] = sha256
        self.added += 1
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def add_failure(self, id: str, source: str, reason: str) -> None:
        """Record an image that could not be encoded; written through at once so a kill keeps it."""
        if self._failures_file is None:
            self._failures_file = open(self.root / f"failures-r{self.rank:05d}.jsonl", "a", encoding="utf-8")
        rec = {"source": str(source), "id": id, "reason": str(reason), "gen": self._next_index}
        self._failures_file.write(json.dumps(rec) + "\n")
        self._failures_file.flush()
        self._session.pop(id, None)
        self.failed += 1

    def flush(self) -> None:
        """Write the queued rows as one shard: temp name first, renamed only when complete."""
        if not self._buffer:
            return
        cols = list(zip(*self._buffer))
        flat = cols[8]
        offsets = np.zeros(len(flat) + 1, dtype=np.int32)
        np.cumsum([len(c) for c in flat], out=offsets[1:])
        codes = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat)),
                                         type=self._schema.field("codes").type)
        arrays = [pa.array(list(col), type=self._schema.field(i).type) for i, col in enumerate(cols[:8])]
        table = pa.Table.from_arrays(arrays + [codes], schema=self._schema)

        final = self.root / f"shard-r{self.rank:05d}-{self._next_index:06d}.parquet"
        if final.exists():
            raise StoreError(f"{final} already exists: another writer with rank {self.rank} is using this store")
        tmp = self.root / f"{self._tmp}{uuid.uuid4().hex}"
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        os.replace(tmp, final)
        self._next_index += 1
        self._buffer.clear()

    def close(self) -> None:
        """Flush the last partial shard and the failures part. finalize_store runs after all ranks close."""
        self.flush()
        if self._failures_file is not None:
            self._failures_file.close()
            self._failures_file = None

    def __enter__(self) -> "CodeStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Queued rows are complete encodings even when the loop failed: keep them.
        self.close()


def finalize_store(root) -> dict:
    """Make the store final (rank 0, after every rank closed): one row per id, merged failures, manifest.

    Rewrites only shards holding superseded rows; each step is atomic, so a kill mid-way is
    repaired by calling it again. Idempotent. Returns the new manifest.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    _remove_temps(root, ".tmp-")  # all ranks are closed: every temp is a leftover
    tmp = ".tmp-final-"
    scan = _scan(root)

    keep: dict = {}
    for _, pos, row, _ in scan.rows.values():
        keep.setdefault(pos, set()).add(row)
    shards = []
    for pos, shard in enumerate(scan.shards):
        rows, total = keep.get(pos, set()), shard.group_starts[-1]
        if not rows:
            shard.path.unlink()
            continue
        if len(rows) < total:
            table = _open_shard(shard.path).read()
            mask = np.zeros(total, dtype=bool)
            mask[sorted(rows)] = True
            out = root / f"{tmp}{uuid.uuid4().hex}"
            pq.write_table(table.filter(pa.array(mask)), out, row_group_size=ROW_GROUP_ROWS, compression="zstd")
            os.replace(out, shard.path)
        shards.append({"file": shard.path.name, "rows": len(rows)})

    failures = [scan.failures[k][1] for k in sorted(scan.failures)]
    _write_atomic(root / FAILURES, "".join(json.dumps(f) + "\n" for f in failures), tmp)
    for p in root.iterdir():
        if _PART_RE.match(p.name):
            p.unlink()

    manifest.update({
        "counts": {"images": len(scan.rows), "failures": len(failures), "shards": len(shards)},
        "shards": shards, "finalized": True, "viq_version": __version__, "updated": _now(),
    })
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n", tmp)
    return manifest


# ---------------------------------------------------------------------------------------------
# reading


class _Group:
    """One decoded row group: columns as Python lists, codes as flat values + offsets."""

    def __init__(self, table: pa.Table):
        self.cols = {c: table.column(c).to_pylist() for c in _COLUMNS[:-1]}
        codes = table.column("codes").combine_chunks()
        self.offsets = codes.offsets.to_numpy()
        self.values = codes.values.to_numpy(zero_copy_only=False)


class CodeStore:
    """Read-only view of a store: ``len``, ``in``, ``get(id)``, iteration sorted by id.

    The id index is built on first use (reads only the ``id`` and ``sha256`` columns); ``get``
    reads the one row group that holds the id and keeps the last few groups cached. Works on an
    unfinalized store too (newest row per id wins, as finalize would decide). Safe to pass to
    DataLoader workers: caches are dropped on pickling and after a fork.
    """

    def __init__(self, root, cache_groups: int = 8):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        self.cache_groups = cache_groups
        self._scan: _Scan | None = None
        self._ids: list | None = None
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict = OrderedDict()
        self._groups: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_groups"] = OrderedDict(), OrderedDict()
        return state

    @property
    def _index(self) -> _Scan:
        if self._scan is None:
            self._scan = _scan(self.root)
        return self._scan

    def __len__(self) -> int:
        return len(self._index.rows)

    def __contains__(self, id) -> bool:
        return id in self._index.rows

    def ids(self) -> list:
        """All ids, sorted."""
        if self._ids is None:
            self._ids = sorted(self._index.rows)
        return list(self._ids)

    def __iter__(self):
        for id_ in self.ids():
            yield self.get(id_)

    def __getitem__(self, id: str) -> CodeRecord:
        return self.get(id)

    def get(self, id: str) -> CodeRecord:
        """The record of one image; KeyError if the store has no row for it."""
        entry = self._index.rows.get(id)
        if entry is None:
            raise KeyError(f"{id!r} is not in the code store {self.root}")
        _, pos, row, _ = entry
        shard = self._index.shards[pos]
        g = bisect.bisect_right(shard.group_starts, row) - 1
        group, i = self._group(pos, g), row - shard.group_starts[g]
        c = group.cols
        h, w = c["h"][i], c["w"][i]
        flat = group.values[group.offsets[i]:group.offsets[i + 1]]
        if flat.size != 4 * h * w:
            raise StoreError(f"{shard.path}: row {row} ({id}) has {flat.size} codes for a {h}x{w} grid; "
                             f"delete the shard and run encode again")
        return CodeRecord(id=c["id"][i], source=c["source"][i], sha256=c["sha256"][i],
                          preprocess=c["preprocess"][i], width=c["width"][i], height=c["height"][i],
                          h=h, w=w, codes=flat.astype(np.int64).reshape(h, w, 4))

    def to_torch(self, id: str):
        """The (h, w, 4) codes of one image as a torch int64 tensor."""
        import torch

        return torch.from_numpy(self.get(id).codes)

    def failures(self) -> list:
        """Failure records ``{"source", "id", "reason"}`` sorted by id (newest per id)."""
        return [self._index.failures[k][1] for k in sorted(self._index.failures)]

    def _group(self, pos: int, g: int) -> _Group:
        if os.getpid() != self._pid:  # forked worker: don't share file handles with the parent
            self._reset_caches()
        key = (pos, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        path = self._index.shards[pos].path
        pf = self._files.get(pos)
        if pf is None:
            pf = self._files[pos] = _open_shard(path)
            if len(self._files) > self.cache_groups:
                self._files.popitem(last=False)
        try:
            group = _Group(pf.read_row_group(g, columns=list(_COLUMNS)))
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"{path}: unreadable shard ({e}); delete it and run encode again") from e
        self._groups[key] = group
        if len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return group
