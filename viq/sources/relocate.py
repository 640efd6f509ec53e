"""From a code store's ``source`` text back to a ``Source``, so the original bytes can be read again.

Why: ``viqctl eval STORE`` compares reconstructions with the originals, and a store encoded from a
WebDataset shard or a Parquet file records ``shard.tar#key.jpg`` or ``data.parquet#image[id]``
(``Source.name``), not a path an image reader can open. This finds the tar member or table row
again (listing each file once per ``Relocator``).
"""

from __future__ import annotations

import re
from pathlib import Path

from viq.errors import ConfigError
from viq.sources.base import Source

_DEFAULT_ID = re.compile(r"/(\d{9})$")  # table ids without --id-column: <file>/<row number in the file>


class Relocator:
    """``find(name, id)`` -> the Source a store row names; a plain path when nothing better is known."""

    def __init__(self):
        self._tars: dict[Path, dict[str, tuple[int, int]]] = {}
        self._rows: dict[tuple[Path, str], dict[str, tuple[int, int]]] = {}
        self._pos: dict[Path, list[tuple[int, int]]] = {}

    def find(self, name: str, id: str) -> Source:
        for i in (m.start() for m in re.finditer("#", name)):
            path = Path(name[:i])
            if not path.is_file():
                continue
            rest = name[i + 1:]
            low = path.name.lower()
            try:
                if low.endswith(".tar"):
                    at = self._tar(path).get(rest)
                    if at is not None:
                        return Source(id, path, "tar", rest, at)
                elif low.endswith((".parquet", ".arrow")) and rest.endswith("]") and "[" in rest:
                    column = rest[:rest.index("[")]
                    kind = "parquet" if low.endswith(".parquet") else "arrow"
                    at = self._row(path, kind, id)
                    if at is not None:
                        return Source(id, path, kind, column, at)
            except ConfigError:
                pass  # unreadable now: the plain path below fails with a message naming it
        return Source(id, Path(name))

    def _tar(self, path: Path) -> dict[str, tuple[int, int]]:
        if path not in self._tars:
            from viq.sources.webdataset import list_shard

            self._tars[path] = {member: (offset, size) for _, member, offset, size in list_shard(path)}
        return self._tars[path]

    def _row(self, path: Path, kind: str, id: str) -> tuple[int, int] | None:
        """(row group or batch, row) of ``id``: by its number for default ids, else by a column holding it."""
        m = _DEFAULT_ID.search(id)
        if m:
            if path not in self._pos:
                self._pos[path] = [(g, r) for g, r, _, _ in _rows(path, kind, None)]
            if int(m.group(1)) < len(self._pos[path]):
                return self._pos[path][int(m.group(1))]
        for column in self._id_columns(path, kind):
            found = self._rows.get((path, column))
            if found is None:
                found = self._rows[(path, column)] = {str(v): (g, r) for g, r, _, v in _rows(path, kind, column)
                                                      if v is not None}
            if id in found:
                return found[id]
        return None

    @staticmethod
    def _id_columns(path: Path, kind: str) -> list[str]:
        import pyarrow as pa

        from viq.sources.tables import _schema

        schema = _schema(path, kind)
        return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                or pa.types.is_integer(f.type)]


def _rows(path: Path, kind: str, column: str | None):
    from viq.sources.tables import _arrow_rows, _parquet_rows

    return _parquet_rows(path, column) if kind == "parquet" else _arrow_rows(path, column)
