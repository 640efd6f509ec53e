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

Integrity: shards carry Parquet page checksums, and every row a ``digest`` (sha256 of all its fields
and codes). A reader checks the row it returns (digest, grid size, code range); a writer opening
the store and ``finalize_store`` check every row. A damaged row (bad digest, codes out of range, an
id twice in one shard) never wins: it counts as a failure of its id at its age, so a resume encodes
that image again and finalize records it in failures.jsonl; a reader asking for it gets an error
naming the shard and row. Ids clash when a later run brings another file under an existing id
(``a/x.jpg`` and ``b/x.jpg`` both give ``x.jpg``): refused. Names that are not valid UTF-8 are stored
with each undecodable byte written ``\\xNN``.
"""

from __future__ import annotations

import bisect
import json
import logging
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
from viq.store_checks import COLUMNS, DIGEST, RowGroup, clean_text, codes_out_of_range, row_digest, row_problem

FORMAT = "viq-code-store v1"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
#: Rows per Parquet row group: random access by id reads one group, not a whole shard.
ROW_GROUP_ROWS = 32
#: Model-info keys that must agree for two runs to share a store.
IDENTITY_KEYS = ("fingerprint", "levels", "codebook_size")

_SHARD_RE = re.compile(r"^shard-r(\d{5,})-(\d{6,})\.parquet$")
_PART_RE = re.compile(r"^failures-r(\d{5,})\.jsonl$")
_COLUMNS = COLUMNS
_MERGED_KEY = -1  # merged failures are older than anything written after the last finalize
log = logging.getLogger(__name__)


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
        ("codes", pa.list_(value)), (DIGEST, pa.string()),
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
    corrupt: dict     # id -> (key, shard position, row, {"source", "id", "reason"}): its newest row is damaged
    sources: dict     # id -> source of its newest entry (row, damaged row or failure)


def _shard_files(root: Path) -> list:
    found = []
    for p in root.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), p))
    return sorted(found)


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
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


def _read_group(pf: pq.ParquetFile, path: Path, g: int, columns=None) -> pa.Table:
    try:
        return pf.read_row_group(g, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: row group {g} is unreadable ({e}); delete the shard and run encode "
                         "again to redo its images") from e


def _scan(root: Path, codebook_size: int | None = None, verify: bool = False) -> _Scan:
    """Resolve every row and failure by "newest wins", setting damaged rows aside.

    ``verify``: decode every row and check it (writers and finalize). Otherwise (readers) only the
    cheap checks run here: code ranges from the Parquet statistics, an id twice in one shard, and the
    digest of the newest row of an id that has several; ``CodeStore.get`` checks the row it returns.
    """
    shards, candidates, bad, sources = [], {}, {}, {}
    for pos, (index, rank, path) in enumerate(_shard_files(root)):
        pf = _open_shard(path)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        shards.append(_Shard(path, rank, index, starts))
        names = pf.schema_arrow.names
        cols = ["id", "sha256", "source"] + ([DIGEST] if DIGEST in names else [])
        ids, shas, srcs = [], [], []
        for g in range(pf.metadata.num_row_groups):
            if verify or codes_out_of_range(pf, g, codebook_size):
                group = RowGroup(_read_group(pf, path, g))
                for i in range(len(group.cols["id"])):
                    problem = row_problem(group, i, codebook_size)
                    if problem:
                        bad[(pos, starts[g] + i)] = problem
                table_cols = group.cols
            else:
                t = _read_group(pf, path, g, columns=cols)
                table_cols = {c: t.column(c).to_pylist() for c in cols}
            ids += table_cols["id"]
            shas += table_cols["sha256"]
            srcs += table_cols["source"]
        first: dict = {}
        for row, (id_, sha, src) in enumerate(zip(ids, shas, srcs)):
            if id_ in first:
                bad[(pos, row)] = f"id also at row {first[id_]} of the same shard (a row was added by hand?)"
            first.setdefault(id_, row)
            candidates.setdefault(id_, []).append(((index, rank, row), pos, row, sha, src))

    groups: dict = {}  # (pos, g) -> RowGroup, for the rows checked below

    def problem_of(pos: int, row: int) -> str | None:
        if (pos, row) not in bad and not verify:  # readers check the rows whose choice matters
            shard = shards[pos]
            g = bisect.bisect_right(shard.group_starts, row) - 1
            if (pos, g) not in groups:
                if len(groups) >= 64:  # bounded memory however many rows were superseded
                    groups.clear()
                groups[(pos, g)] = RowGroup(_read_group(_open_shard(shard.path), shard.path, g))
            bad[(pos, row)] = row_problem(groups[(pos, g)], row - shard.group_starts[g], codebook_size)
        return bad.get((pos, row))

    rows, corrupt = {}, {}
    for id_, cands in candidates.items():
        cands.sort(key=lambda c: c[0], reverse=True)
        key, pos, row, sha, src = cands[0]
        sources[id_] = src
        if not bad.get((pos, row)) and (len(cands) == 1 or not problem_of(pos, row)):
            rows[id_] = (key, pos, row, sha)
            continue
        # the newest row is damaged: a sound row of the same file content (same sha256) stands in for
        # it (e.g. the original beside a bogus row appended to its shard); otherwise the image is redone
        stand_in = next((c for c in cands[1:] if c[3] == sha and not problem_of(c[1], c[2])), None)
        if stand_in is not None:
            rows[id_] = (key, stand_in[1], stand_in[2], sha)
        else:
            reason = f"{shards[pos].path.name}: row {row} is damaged ({bad[(pos, row)]}); encode it again"
            corrupt[id_] = (key, pos, row, {"source": src, "id": id_, "reason": reason})

    failures, order, max_gen = {}, 0, -1
    sources_f = [(root / FAILURES, None)] if (root / FAILURES).is_file() else []
    sources_f += sorted((p, int(m.group(1))) for p in root.iterdir() if (m := _PART_RE.match(p.name)))
    for path, rank in sources_f:
        for rec in _read_failures(path, strict=rank is None):
            order += 1
            gen = _MERGED_KEY if rank is None else int(rec.get("gen", 0))
            max_gen = max(max_gen, gen)
            key = (gen, -1, order)  # rank -1: a row flushed at the same index is newer
            clean = {"source": rec.get("source"), "id": rec["id"], "reason": rec.get("reason")}
            if rec["id"] not in failures or failures[rec["id"]][0] < key:
                failures[rec["id"]] = (key, clean)

    for id_ in list(failures):
        newest_row = rows.get(id_, corrupt.get(id_))
        if newest_row is not None:
            if newest_row[0] > failures[id_][0]:
                del failures[id_]
            else:
                rows.pop(id_, None)
                corrupt.pop(id_, None)
                sources[id_] = failures[id_][1].get("source")
        else:
            sources[id_] = failures[id_][1].get("source")
    # Unmerged failures count too: a killed finalize may have deleted the shard with the top index.
    next_index = max(max((s.index for s in shards), default=-1) + 1, max_gen)
    return _Scan(shards, rows, failures, next_index, corrupt, sources)


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

        scan = _scan(self.root, self.codebook_size, verify=True)  # every row checked: damaged ones are redone
        self._finished = {id_: r[3] for id_, r in scan.rows.items()}
        self._sources = scan.sources
        #: rows found damaged on open ({"source", "id", "reason"}); their images are not "finished".
        self.damaged = [c[3] for c in scan.corrupt.values()]
        self._damaged = {rec["id"]: rec for rec in self.damaged}
        for rec in self.damaged[:20]:
            log.warning("%s: %s", self.root, rec["reason"])
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

    def damaged_row(self, id: str) -> dict | None:
        """``{"source", "id", "reason"}`` if ``id``'s row was damaged when this writer opened (adding
        ``id`` again redoes it: encode's summary lists those), else None."""
        return self._damaged.get(clean_text(id))

    def needs_encoding(self, id: str, sha256: str) -> bool:
        """True unless a row for this id with this source hash is committed or already added here."""
        id = clean_text(id)
        return self._session.get(id, self._finished.get(id)) != sha256

    def _check_clash(self, id: str, source: str) -> None:
        """A later run bringing another file under an id already in the store would replace it silently."""
        was = self._sources.get(id)
        if was is not None and was != source:
            raise StoreError(f"{self.root}: id {id!r} already names {was}, and this run gives it to {source}. "
                             "Ids are paths relative to the input folder, so two folders can give one id: "
                             "encode their common parent folder instead, give explicit ids in a .jsonl list "
                             "({\"path\": ..., \"id\": ...} per line), or use another --out")

    def add(self, id: str, source: str, sha256: str, width: int, height: int, codes: np.ndarray) -> None:
        """Queue one image's (h, w, 4) code grid; a shard is written every ``rows_per_shard`` rows."""
        id, source = clean_text(id), clean_text(source)
        self._check_clash(id, source)
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[2] != 4 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise StoreError(f"{id}: codes must have shape (h, w, 4) with h, w >= 1, got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise StoreError(f"{id}: codes must be integers, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise StoreError(f"{id}: codes range [{lo}, {hi}] is outside [0, {self.codebook_size})")
        h, w = codes.shape[:2]
        if int(width) < 1 or int(height) < 1:
            raise StoreError(f"{id}: image size must be >= 1, got {width}x{height}")
        flat = codes.astype(self._dtype).reshape(-1)
        self._buffer.append((id, source, sha256, self.preprocess, int(width), int(height), h, w, flat,
                             row_digest(id, source, sha256, self.preprocess, width, height, h, w, flat)))
        self._session[id] = sha256
        self._sources[id] = source
        self.added += 1
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def add_failure(self, id: str, source: str, reason: str) -> None:
        """Record an image that could not be encoded; written through at once so a kill keeps it."""
        id, source = clean_text(id), clean_text(source)
        self._check_clash(id, source)
        self._sources[id] = source
        if self._failures_file is None:
            self._failures_file = open(self.root / f"failures-r{self.rank:05d}.jsonl", "a", encoding="utf-8")
        rec = {"source": source, "id": id, "reason": clean_text(reason), "gen": self._next_index}
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
        digests = pa.array(list(cols[9]), type=pa.string())
        table = pa.Table.from_arrays(arrays + [codes, digests], schema=self._schema)

        final = self.root / f"shard-r{self.rank:05d}-{self._next_index:06d}.parquet"
        if final.exists():
            raise StoreError(f"{final} already exists: another writer with rank {self.rank} is using this store")
        tmp = self.root / f"{self._tmp}{uuid.uuid4().hex}"
        # codes: byte-stream split + zstd, no dictionary (1.79 B/code for uniform 14-bit codes, not 2.07:
        # benchmarks/store_size.py)
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd", write_page_checksum=True,
                       use_dictionary=[n for n in table.column_names if n != "codes"],
                       use_byte_stream_split=["codes.list.element"])
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
    try:
        codebook_size = _codebook_size(manifest.get("model") or {})
    except StoreError:
        codebook_size = None
    scan = _scan(root, codebook_size, verify=True)  # damaged rows lose: recorded as failures below

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
            pq.write_table(table.filter(pa.array(mask)), out, row_group_size=ROW_GROUP_ROWS, compression="zstd",
                           write_page_checksum=True, use_dictionary=[n for n in table.column_names if n != "codes"],
                           use_byte_stream_split=["codes.list.element"])
            os.replace(out, shard.path)
        shards.append({"file": shard.path.name, "rows": len(rows)})

    lost = {id_: c[3] for id_, c in scan.corrupt.items()}
    failures = [lost[k] if k in lost else scan.failures[k][1] for k in sorted(set(scan.failures) | set(lost))]
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


class CodeStore:
    """Read-only view of a store: ``len``, ``in``, ``get(id)``, iteration sorted by id.

    The id index is built on first use (reads the ``id``, ``sha256``, ``source`` and ``digest``
    columns); ``get`` reads the one row group that holds the id, checks the row (digest, grid,
    code range) and keeps the last few groups cached. Works on an unfinalized store too (newest row
    per id wins, as finalize would decide). An id whose newest row is damaged is listed, and ``get``
    raises a ``StoreError`` naming the shard and row. Safe to pass to DataLoader workers: caches are
    dropped on pickling and after a fork.
    """

    def __init__(self, root, cache_groups: int = 8):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        try:
            self.codebook_size: int | None = _codebook_size(self.manifest.get("model") or {})
        except StoreError:
            self.codebook_size = None
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
            self._scan = _scan(self.root, self.codebook_size)
        return self._scan

    def __len__(self) -> int:
        return len(self._index.rows) + len(self._index.corrupt)

    def __contains__(self, id) -> bool:
        id = clean_text(id)
        return id in self._index.rows or id in self._index.corrupt

    def ids(self) -> list:
        """All ids, sorted (those whose row is damaged too: ``get`` names the damage)."""
        if self._ids is None:
            self._ids = sorted(set(self._index.rows) | set(self._index.corrupt))
        return list(self._ids)

    def damaged(self) -> list:
        """``{"source", "id", "reason"}`` of every id whose newest row is damaged (found so far)."""
        return [self._index.corrupt[k][3] for k in sorted(self._index.corrupt)]

    def __iter__(self):
        for id_ in self.ids():
            yield self.get(id_)

    def __getitem__(self, id: str) -> CodeRecord:
        return self.get(id)

    def get(self, id: str) -> CodeRecord:
        """The record of one image; KeyError if the store has no row for it, StoreError (naming the
        shard and row) if its row is damaged."""
        id = clean_text(id)
        if id in self._index.corrupt:
            raise StoreError(f"{self.root}: {id!r}: {self._index.corrupt[id][3]['reason']} (its input, to replace it)")
        entry = self._index.rows.get(id)
        if entry is None:
            raise KeyError(f"{id!r} is not in the code store {self.root}")
        _, pos, row, _ = entry
        shard = self._index.shards[pos]
        g = bisect.bisect_right(shard.group_starts, row) - 1
        group, i = self._group(pos, g), row - shard.group_starts[g]
        c = group.cols
        problem = row_problem(group, i, self.codebook_size)
        if problem is None and c["id"][i] != id:
            problem = f"holds id {c['id'][i]!r}, not {id!r}"
        if problem:
            raise StoreError(f"{shard.path}: row {row} ({id!r}) is damaged: {problem}; run encode again on its "
                             "input to replace it")
        h, w = c["h"][i], c["w"][i]
        flat = group.values[group.offsets[i]:group.offsets[i + 1]]
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

    def _group(self, pos: int, g: int) -> RowGroup:
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
        group = RowGroup(_read_group(pf, path, g))
        self._groups[key] = group
        if len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return group
