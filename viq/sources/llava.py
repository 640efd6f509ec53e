"""LLaVA-style conversation files (``.json`` list or ``.jsonl``): every image they reference, once.

The id of an image is its path exactly as the file writes it (``00000/000000001.jpg``), or
``patch@start_num`` for an entry packed in a larger file: the key the offline MLLM stage
(``viq.mllm.offline.store_key``) looks codes up by. Relative paths resolve against the image
root (``--image-root``, default the data file's folder), as ``viq.data.conversations`` does.
Entries are a path string, ``{"img_path": ...}``, or ``{"patch", "start_num", "size"
[, "image_encoding": "base64"]}``; the ``image`` field holds one entry or a list of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from viq.errors import ConfigError
from viq.sources.base import Source, absolute
from viq.sources.files import first_json_row, is_url, url_error


def looks_like_llava(path: Path) -> bool:
    """A .json file always is one; a .jsonl file when its first row has ``conversations``."""
    if path.suffix.lower() == ".json":
        return True
    row = first_json_row(path)
    return isinstance(row, dict) and "conversations" in row


def iter_json_list(f, chunk: int = 1 << 20) -> Iterator[Any]:
    """The items of a JSON list read from text stream ``f`` one at a time (memory: one item plus
    ``chunk``), so a LLaVA file of a million samples is never held whole. ValueError if malformed."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        data = f.read(chunk)
        eof = not data
        buf, pos = buf[pos:] + data, 0
        return not eof

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    if skip_space() != "[":
        raise ValueError("the file does not start with '['")
    pos += 1
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            skip_space()
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    if eof or not more():  # the item is really malformed (or the file ends inside it)
                        raise
            # a number cut by the chunk's end ("3." of "3.25") decodes too: accept an item only when a
            # separator follows it (or the file ends), else decode again with more text
            if (end == len(buf) or buf[end] not in " \t\r\n,]") and not eof and more():
                continue
            pos = end
            yield item
            sep = skip_space()
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise ValueError(f"expected ',' or ']' between samples, found {sep or 'the end of the file'!r}")
    if skip_space():
        raise ValueError("text after the closing ']'")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        if path.suffix.lower() == ".json":
            with open(path, encoding="utf-8") as f:
                for i, rec in enumerate(iter_json_list(f)):
                    yield f"{path}: sample {i}", rec
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}); a LLaVA .json file holds a list of samples") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not a JSON list of samples ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _entry(where: str, entry: Any, root: Path) -> Source:
    if isinstance(entry, str):
        entry = {"img_path": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an image entry must be a path or an object, got {type(entry).__name__}")
    packed = "patch" in entry
    written = entry.get("patch" if packed else "img_path")
    if not isinstance(written, str) or not written:
        raise ConfigError(f"{where}: an image entry needs a non-empty {'patch' if packed else 'img_path'} string")
    if is_url(written):
        raise url_error(written)
    path = Path(written)
    path = absolute(path if path.is_absolute() else root / path)
    if not packed:
        return Source(written, path)
    offset, length = entry.get("start_num"), entry.get("size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
        raise ConfigError(f"{where}: a packed image entry needs integer start_num and size")
    kind = "packed-base64" if entry.get("image_encoding") == "base64" else "packed"
    return Source(f"{written}@{offset}", path, kind, "", (offset, length))


def llava_sources(path: Path, image_root: Path | None = None) -> list[Source]:
    """One source per distinct image the file references (samples without images are fine)."""
    root = Path(image_root) if image_root is not None else path.parent
    seen: dict[str, Source] = {}
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: a sample must be a JSON object")
        images = rec.get("image")
        if images is None:
            continue
        for entry in images if isinstance(images, list) else [images]:
            src = _entry(where, entry, root)
            seen.setdefault(src.id, src)
    if not seen:
        raise ConfigError(f"{path}: no sample references an image (no 'image' fields)")
    return list(seen.values())
