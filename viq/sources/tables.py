"""Hugging Face datasets on disk: Parquet files (the Hub's format), folders of them, and folders
written by ``datasets``' ``save_to_disk`` (Arrow stream files + ``state.json``).

The image column is the one ``datasets`` marks as an ``Image`` feature (a ``{bytes, path}`` struct),
else the only struct with a binary ``bytes`` field or the only binary column; ``--image-column``
names it otherwise. Ids are ``<file stem>/<row>`` (row within that file, 9 digits), or the values of
``--id-column``. Listing reads only metadata (or the id column); the encoder reads one row group /
record batch at a time, never the whole table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from viq.errors import ConfigError, ImageError
from viq.sources.base import Source, absolute, read_file


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def saved_arrow_files(folder: Path) -> list[tuple[str, Path]]:
    """(id prefix, arrow file) of a ``save_to_disk`` folder (a Dataset or a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{folder / 'dataset_dict.json'}: unreadable ({e})") from None
        return [(f"{s}/{prefix}", p) for s in splits for prefix, p in saved_arrow_files(folder / s)]
    try:
        files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder / 'state.json'}: not a datasets save_to_disk state ({e})") from None
    return [(Path(f).stem, folder / f) for f in files]


def _schema(path: Path, kind: str) -> pa.Schema:
    try:
        if kind == "parquet":
            return pq.read_schema(path)
        with pa.memory_map(str(path)) as mm:
            return pa.ipc.open_stream(mm).schema
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable {kind} file ({e})") from None


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" and _is_binary(t.field(i).type)
                                         for i in range(t.num_fields))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def find_image_column(schema: pa.Schema, path: Path, wanted: str | None = None) -> str:
    """The column holding the images (see the module docstring); ConfigError listing the choices."""
    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise ConfigError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
        t = schema.field(wanted).type
        if not (_is_image_struct(t) or _is_binary(t)):
            raise ConfigError(f"{path}: column {wanted!r} is {t}, not images (binary or a {{bytes, path}} struct)")
        return wanted
    marked = []
    try:
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = (meta.get("info") or {}).get("features") or {}
        marked = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image" and n in names]
    except (ValueError, AttributeError):
        pass
    if len(marked) == 1:
        return marked[0]
    structs = [n for n in names if _is_image_struct(schema.field(n).type)]
    binaries = [n for n in names if _is_binary(schema.field(n).type)]
    for choice in (marked, structs, binaries):
        if len(choice) == 1:
            return choice[0]
        if len(choice) > 1:
            raise ConfigError(f"{path}: several image columns ({', '.join(choice)}); choose one with --image-column")
    raise ConfigError(f"{path}: no image column (a datasets Image {{bytes, path}} struct or binary) among "
                      f"{', '.join(names)}; name it with --image-column")


def _parquet_rows(path: Path, id_column: str | None):
    """(row group, row in group, row in file, id value or None) of every row."""
    try:
        pf = pq.ParquetFile(path)
        n = 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            ids = pf.read_row_group(g, columns=[id_column]).column(0).to_pylist() if id_column else [None] * rows
            for r, v in enumerate(ids):
                yield g, r, n, v
                n += 1
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: unreadable Parquet file ({e})") from None


def _arrow_rows(path: Path, id_column: str | None):
    try:
        with pa.memory_map(str(path)) as mm:
            reader = pa.ipc.open_stream(mm)
            n = 0
            for b, batch in enumerate(reader):
                ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
                for r, v in enumerate(ids):
                    yield b, r, n, v
                    n += 1
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: unreadable Arrow file ({e})") from None


def table_sources(files: list[tuple[str, Path]], kind: str, image_column: str | None = None,
                  id_column: str | None = None) -> list[Source]:
    """Sources for every row of these (id prefix, file) pairs; ``kind`` is ``parquet`` or ``arrow``."""
    out = []
    for prefix, path in files:
        schema = _schema(path, kind)
        col = find_image_column(schema, path, image_column)
        if id_column is not None and id_column not in schema.names:
            raise ConfigError(f"{path}: no column {id_column!r} for --id-column (columns: {', '.join(schema.names)})")
        rows = _parquet_rows(path, id_column) if kind == "parquet" else _arrow_rows(path, id_column)
        for group, row, n, value in rows:
            if id_column is not None and (value is None or isinstance(value, (bytes, dict, list))):
                raise ConfigError(f"{path}: row {n} has no usable {id_column!r} id ({value!r})")
            id_ = str(value) if id_column is not None else f"{prefix}/{n:09d}"
            out.append(Source(id_, absolute(path), kind, col, (group, row)))
    return out


def read_batch(path: Path, kind: str, column: str, group: int, name: str) -> pa.Array:
    """One row group (Parquet) or record batch (Arrow) of the image column."""
    try:
        if kind == "parquet":
            return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).combine_chunks()
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # left open: the batch's buffers map it
        for b, batch in enumerate(reader):
            if b == group:
                return batch.column(column)
    except (pa.ArrowException, OSError, KeyError) as e:
        raise ImageError(f"{name}: cannot read the {kind} file ({e})") from None
    raise ImageError(f"{name}: the {kind} file has no batch {group} (changed since it was listed?)")


def cell_bytes(column: pa.Array, row: int, src: Source, max_bytes: int) -> bytes | None:
    """The image bytes of one cell: binary, or a ``{bytes, path}`` struct (path read when bytes are null)."""
    value = column[row].as_py()
    if isinstance(value, dict):
        data, where = value.get("bytes"), value.get("path")
        if data is None and where:
            p = Path(where)
            return read_file(p if p.is_absolute() else src.path.parent / p, max_bytes, f"{src.name} -> {where}")
        value = data
    if value is not None and len(value) > max_bytes:
        raise ImageError(f"{src.name}: {len(value)} bytes exceeds the limit of {max_bytes} bytes per image")
    return value


def parquet_files_in(folder: Path) -> list[tuple[str, Path]]:
    """(id prefix, file) of every .parquet file below ``folder``; prefix = its path without .parquet."""
    from viq.sources.files import walk_files

    found = [Path(d) / n for d, n in walk_files(folder) if n.endswith(".parquet")]
    return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in sorted(found)]
