"""Image files on disk: folders, glob patterns and ``.txt`` / ``.jsonl`` lists of paths.

Walking never hangs: only regular files are listed (a FIFO or a device named ``x.png`` is
skipped), symlinked folders are followed but each real folder is entered once, so a symlink loop
ends the walk instead of repeating it, and ``**`` globs use the same walk.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import stat
from pathlib import Path

from viq.errors import ConfigError
from viq.sources.base import Source, absolute

_MAGIC = set("*?[")
#: Container files a folder or glob may hold instead of images (read by their own modules).
CONTAINERS = (".tar", ".parquet", ".arrow")


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset:
    """Every extension Pillow opens in a format viq decodes (``.avif`` when Pillow has AVIF, ...)."""
    from PIL import Image

    from viq.images import SAFE_FORMATS

    Image.init()
    found = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in SAFE_FORMATS}
    return frozenset(found | {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in image_extensions()


def is_url(text: str) -> bool:
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isalpha() and len(head) > 1  # "C://x" is not a URL scheme we mean


def url_error(text: str) -> ConfigError:
    return ConfigError(f"{text!r} is a URL: viq does not fetch images; download them first with img2dataset "
                       "(https://github.com/rom1504/img2dataset) and encode its WebDataset .tar shards")


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # follows symlinks: a link to a regular file is fine
    except OSError:
        return False


def walk_files(root: Path, recursive: bool = True):
    """Yield (folder, file name) of every regular, non-hidden file below ``root``.

    Symlinked folders are followed after every real folder has been walked, and a real folder
    (device, inode) is entered only once: a file keeps the name of its real path, and a symlink
    loop ends instead of repeating.
    """
    seen: set = set()
    links: list = []

    def visit(folder: str):
        try:
            st = os.stat(folder)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
                is_link = e.is_symlink()
            except OSError:
                continue
            if is_dir:
                (links if is_link else subdirs).append(e.path)
            elif _is_regular(e.path):
                yield folder, e.name
        if recursive:
            for d in subdirs:
                yield from visit(d)

    yield from visit(str(root))
    while recursive and links:
        yield from visit(links.pop(0))


def walk_images(root: Path, recursive: bool = True) -> list[Source]:
    """Image files of a folder; id = POSIX path relative to the folder."""
    out = []
    for folder, name in walk_files(root, recursive):
        if is_image_name(name):
            path = Path(folder) / name
            out.append(Source(path.relative_to(root).as_posix(), absolute(path)))
    return out


def glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """(the pattern's fixed leading folder, matching regular files). ``**`` spans folders.

    Like the shell, ``*`` and ``?`` do not match a leading dot; case is significant.
    """
    parts = Path(pattern).parts
    first = next(i for i, q in enumerate(parts) if _MAGIC & set(q))
    base = Path(*parts[:first]) if first else Path(".")
    rest = list(parts[first:])
    hits = []
    for folder, name in walk_files(base, recursive="**" in rest or len(rest) > 1):
        rel = (Path(folder) / name).relative_to(base).parts
        if _match(list(rel), rest):
            hits.append(Path(folder) / name)
    return base, sorted(hits)


def _match(names: list[str], pats: list[str]) -> bool:
    if not pats:
        return not names
    if pats[0] == "**":
        return any(_match(names[k:], pats[1:]) for k in range(len(names) + 1))
    if not names:
        return False
    if names[0].startswith(".") and not pats[0].startswith("."):
        return False
    return fnmatch.fnmatchcase(names[0], pats[0]) and _match(names[1:], pats[1:])


def has_magic(text: str) -> bool:
    return bool(_MAGIC & set(text))


def glob_images(matched: list[Path], base: Path) -> list[Source]:
    """Image files among a glob's matches; id = path relative to the pattern's fixed folders."""
    return [Source(p.relative_to(base).as_posix(), absolute(p)) for p in matched if is_image_name(p.name)]


def _read_lines(list_file: Path) -> list[str]:
    try:
        return list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read list file {str(list_file)!r}: {e}") from None


def _listed(list_file: Path, written: str, id_: str | None) -> Source:
    if is_url(written):
        raise url_error(written)
    path = Path(os.path.expanduser(written))
    if not path.is_absolute():
        path = list_file.parent / path
    return Source(id_ if id_ is not None else written, absolute(path))


def read_txt(list_file: Path) -> list[Source]:
    """One path per line (``#`` comments); relative paths against the list's folder; id = as written."""
    out = []
    for line in _read_lines(list_file):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(_listed(list_file, line, None))
    return out


def first_json_row(list_file: Path):
    """The first non-empty line of a .jsonl file parsed (None when unparsable or empty)."""
    try:
        with open(list_file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def read_jsonl(list_file: Path) -> list[Source]:
    """``{"path"|"image": ..., "id"?: ...}`` per line."""
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
