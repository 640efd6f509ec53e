"""Many code stores read as one: the stores of ``--shard I/N`` jobs, or of several data sets.

``CodeStores([a, b, c])`` answers like one ``CodeStore``: ``len``, ``in``, ``get(id)``, ``ids()``,
iteration sorted by id, ``failures()``. The stores must hold codes of one model (same identity:
fingerprint, FSQ levels, codebook size) and one preprocessing; an id present in two stores is
refused unless both rows are the same image (same source sha256), so nothing is silently shadowed.
To make one store on disk instead, run the jobs into the same ``--out`` (``--shard`` keeps their
files apart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from viq.errors import StoreError
from viq.store import IDENTITY_KEYS, CodeRecord, CodeStore


class CodeStores:
    """A read-only union of code stores (see the module docstring)."""

    def __init__(self, stores: Sequence, cache_groups: int = 8):
        self.stores = [s if isinstance(s, CodeStore) else CodeStore(s, cache_groups) for s in stores]
        if not self.stores:
            raise StoreError("CodeStores needs at least one store")
        first = self.stores[0].manifest
        for s in self.stores[1:]:
            m = s.manifest
            diffs = [k for k in IDENTITY_KEYS if (m.get("model") or {}).get(k) != (first.get("model") or {}).get(k)]
            if m.get("preprocess") != first.get("preprocess"):
                diffs.append("preprocess")
            if diffs:
                raise StoreError(f"{s.root} and {self.stores[0].root} differ in {', '.join(diffs)}: "
                                 "codes of different models or preprocessing cannot be read as one")
        self.manifest = first
        self._where: dict | None = None

    @property
    def _index(self) -> dict:
        if self._where is None:
            where: dict = {}
            for k, s in enumerate(self.stores):
                for id_ in s.ids():
                    if id_ in where:
                        other = self.stores[where[id_]]
                        if other.get(id_).sha256 != s.get(id_).sha256:
                            raise StoreError(f"id {id_!r} is in {other.root} and {s.root} with different images")
                        continue
                    where[id_] = k
            self._where = where
        return self._where

    @property
    def roots(self) -> list[Path]:
        return [s.root for s in self.stores]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id) -> bool:
        return id in self._index

    def ids(self) -> list:
        return sorted(self._index)

    def get(self, id: str) -> CodeRecord:
        k = self._index.get(id)
        if k is None:
            raise KeyError(f"{id!r} is in none of the code stores {', '.join(map(str, self.roots))}")
        return self.stores[k].get(id)

    __getitem__ = get

    def __iter__(self) -> Iterable[CodeRecord]:
        for id_ in self.ids():
            yield self.get(id_)

    def failures(self) -> list:
        """Failures of every store, minus ids another store has codes for."""
        out = {}
        for s in self.stores:
            for f in s.failures():
                if f["id"] not in self._index:
                    out.setdefault(f["id"], f)
        return [out[k] for k in sorted(out)]
