"""Turning command-line inputs (files, folders, globs, list files) into a list of image sources.

The result is sorted by id, so every rank of a multi-process run sees the same list and
``shard_for_rank`` gives each rank a disjoint, deterministic share. A path named inside a list file
that does not exist is kept: the encoder reports it as a per-file failure rather than a usage error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from viq.errors import ConfigError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_MAGIC = set("*?[")


@dataclass(frozen=True)
class Source:
    """One image to encode: ``id`` is its stable key in the code store, ``path`` is absolute."""

    id: str
    path: Path


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def collect_sources(inputs: list[str], recursive: bool = True) -> list[Source]:
    """Expand inputs into sources sorted by id.

    Each input is a folder (image files inside, hidden names skipped; id = POSIX path relative to
    the folder), a ``.txt`` list (one path per line, ``#`` comments, relative paths against the
    list's folder; id = the path as written), a ``.jsonl`` list (``{"path"|"image": ..., "id"?:
    ...}`` per line), any other file (id = its file name) or a glob pattern (image files only;
    id = path relative to the pattern's fixed leading folders). A missing input or a glob that
    matches no image, or a folder without one, is a ``ConfigError``. The same file reached twice is kept once; two different
    files with the same id are a ``ConfigError`` listing them (give explicit ids in a .jsonl list,
    or pass a common parent folder).
    """
    found: list[Source] = []
    for text in inputs:
        found.extend(_expand(str(text), recursive))
    by_id: dict[str, set[Path]] = {}
    for s in found:
        by_id.setdefault(s.id, set()).add(s.path)
    clashes = {i: sorted(map(str, ps)) for i, ps in by_id.items() if len(ps) > 1}
    if clashes:
        shown = "; ".join(f"{i!r}: {', '.join(ps)}" for i, ps in sorted(clashes.items())[:10])
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise ConfigError(f"{len(clashes)} id(s) name different files: {shown}{more}. Give explicit "
                          "ids in a .jsonl list or pass a common parent folder instead")
    return sorted({Source(i, next(iter(ps))) for i, ps in by_id.items()}, key=lambda s: s.id)


def _expand(text: str, recursive: bool) -> list[Source]:
    p = Path(os.path.expanduser(text))
    if p.is_dir():
        return _walk(p, recursive)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".txt":
            return _read_txt(p)
        if suffix == ".jsonl":
            return _read_jsonl(p)
        return [Source(p.name, _absolute(p))]
    if _MAGIC & set(text):
        return _glob(os.path.expanduser(text))
    if p.exists():
        raise ConfigError(f"input {text!r} is neither a file nor a folder")
    raise ConfigError(f"input not found: {text!r} (no such file, folder or matching glob)")


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p))  # abspath, not resolve: keep symlinked names the user chose


def _walk(root: Path, recursive: bool) -> list[Source]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for f in files:
            if not f.startswith(".") and is_image_name(f):
                path = Path(folder) / f
                out.append(Source(path.relative_to(root).as_posix(), _absolute(path)))
    if not out:
        raise ConfigError(f"folder {str(root)!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}"
                          f"{'' if recursive else '; subfolders not searched'})")
    return out


def _glob(pattern: str) -> list[Source]:
    # ids are relative to the pattern's leading folders without wildcards, like a folder input
    parts = Path(pattern).parts
    fixed = [q for q in parts[: next(i for i, q in enumerate(parts) if _MAGIC & set(q))]]
    base = Path(*fixed) if fixed else Path(".")
    out = []
    for m in sorted(glob.glob(pattern, recursive=True)):
        path = Path(m)
        if path.is_file() and is_image_name(path.name):
            out.append(Source(path.relative_to(base).as_posix(), _absolute(path)))
    if not out:
        raise ConfigError(f"glob {pattern!r} matches no image files "
                          f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return out


def _read_lines(list_file: Path) -> list[str]:
    try:
        return list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read list file {str(list_file)!r}: {e}") from None


def _listed(list_file: Path, written: str, id_: str | None) -> Source:
    path = Path(os.path.expanduser(written))
    if not path.is_absolute():
        path = list_file.parent / path
    return Source(id_ if id_ is not None else written, _absolute(path))


def _read_txt(list_file: Path) -> list[Source]:
    out = []
    for line in _read_lines(list_file):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(_listed(list_file, line, None))
    return out


def _read_jsonl(list_file: Path) -> list[Source]:
    out = []
    for n, line in enumerate(_read_lines(list_file), 1):
        if not line.strip():
            continue
        where = f"{list_file}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: each line must be a JSON object")
        written = row.get("path", row.get("image"))
        if not isinstance(written, str) or not written:
            raise ConfigError(f"{where}: needs a non-empty string 'path' (or 'image')")
        id_ = row.get("id")
        if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, (str, int))):
            raise ConfigError(f"{where}: 'id' must be a string or an integer")
        out.append(_listed(list_file, written, None if id_ is None else str(id_)))
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (provenance of an input image).

    An unreadable file raises the plain ``OSError``: the caller decides whose fault it is.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_for_rank(sources: list[Source], rank: int, world_size: int) -> list[Source]:
    """Rank ``rank``'s share: every ``world_size``-th source of the id-sorted list, from ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return sorted(sources, key=lambda s: (s.id, str(s.path)))[rank::world_size]
