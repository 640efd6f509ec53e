"""Turning command-line inputs into a list of image sources, whatever format holds the images.

Inputs: image files, folders (every format Pillow opens), glob patterns, ``.txt`` / ``.jsonl``
lists of paths (``viq.sources.files``); WebDataset ``.tar`` shards and brace patterns
(``viq.sources.webdataset``); Parquet files, folders of them and ``datasets.save_to_disk`` folders
(``viq.sources.tables``); LLaVA ``.json`` / ``.jsonl`` conversation files (``viq.sources.llava``).
URLs are refused with a pointer to img2dataset.

The result is sorted by id, so every rank of a multi-process run (and every ``--shard I/N`` job)
sees the same list and ``shard_for_rank`` gives each a disjoint, deterministic share. A path named
inside a list file that does not exist is kept: the encoder reports it as a per-file failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from viq.errors import ConfigError
from viq.sources.base import DEFAULT_MAX_BYTES, Source, SourceReader, absolute, sha256_file
from viq.sources.files import (glob_files, glob_images, has_magic, image_extensions, is_image_name, is_url,
                               read_jsonl, read_txt, url_error, walk_images)
from viq.sources.llava import llava_sources, looks_like_llava
from viq.sources.tables import is_saved_dataset, parquet_files_in, saved_arrow_files, table_sources
from viq.sources.webdataset import COMPRESSED, expand_braces, has_braces, tar_sources

__all__ = ["Source", "SourceReader", "InputOptions", "collect_sources", "shard_for_rank", "parse_shard",
           "sha256_file", "is_image_name", "image_extensions", "DEFAULT_MAX_BYTES"]


def __getattr__(name):
    if name == "IMAGE_EXTENSIONS":  # kept for callers of the old module; Pillow decides the set
        return image_extensions()
    raise AttributeError(name)


@dataclass(frozen=True)
class InputOptions:
    """How to read inputs that need more than a path: dataset columns, the LLaVA image root."""

    image_column: str | None = None
    id_column: str | None = None
    image_root: Path | None = None


def collect_sources(inputs: list[str], recursive: bool = True, options: InputOptions | None = None) -> list[Source]:
    """Expand inputs into sources sorted by id.

    Folders: image files inside (hidden names skipped; id = POSIX path relative to the folder); a
    folder without images but with ``.parquet`` files, or saved by ``datasets``, is a dataset. Files
    by kind: ``.txt`` list (id = the path as written), ``.jsonl`` list (``{"path"|"image", "id"?}``)
    or LLaVA file (rows with ``conversations``), ``.json`` LLaVA file, ``.tar`` shard, ``.parquet``
    / ``.arrow`` table, anything else an image (id = its file name). Globs and ``{a,b}`` /
    ``{000..009}`` brace patterns expand first. The same image reached twice is kept once; two
    different images with one id are a ``ConfigError`` listing them.
    """
    options = options or InputOptions()
    found: list[Source] = []
    for text in inputs:
        text = str(text)
        items = expand_braces(text) if has_braces(text) else [text]
        tars = [Path(os.path.expanduser(i)) for i in items if i.lower().endswith(".tar")]
        tars = [t for t in tars if t.is_file()]
        if len(tars) > 1:  # one input over many shards: keys are checked for clashes across all of them
            found.extend(tar_sources([absolute(t) for t in tars]))
            items = [i for i in items if Path(os.path.expanduser(i)) not in tars]
        for item in items:
            found.extend(_expand(item, recursive, options))
    by_id: dict[str, dict] = {}
    for s in found:
        by_id.setdefault(s.id, {}).setdefault(s.locator, s)
    clashes = {i: sorted(s.name for s in ss.values()) for i, ss in by_id.items() if len(ss) > 1}
    if clashes:
        shown = "; ".join(f"{i!r}: {', '.join(ps)}" for i, ps in sorted(clashes.items())[:10])
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise ConfigError(f"{len(clashes)} id(s) name different images: {shown}{more}. Give explicit "
                          "ids in a .jsonl list, pass a common parent folder, or pick another --id-column")
    return sorted((next(iter(ss.values())) for ss in by_id.values()), key=lambda s: s.id)


def _expand(text: str, recursive: bool, options: InputOptions) -> list[Source]:
    if is_url(text):
        raise url_error(text)
    p = Path(os.path.expanduser(text))
    if p.is_dir():
        return _folder(p, recursive, options)
    if p.is_file():
        return _file(p, options)
    if has_magic(text):
        base, matched = glob_files(os.path.expanduser(text))
        out = glob_images(matched, base)
        tars = [m for m in matched if m.name.endswith(".tar")]
        out += tar_sources(tars) if tars else []
        tables = [(m.relative_to(base).with_suffix("").as_posix(), m) for m in matched if m.suffix == ".parquet"]
        out += table_sources(tables, "parquet", options.image_column, options.id_column) if tables else []
        if not out:
            raise ConfigError(f"glob {text!r} matches no image files, .tar shards or .parquet files")
        return out
    if p.exists():
        raise ConfigError(f"input {text!r} is neither a regular file nor a folder (a FIFO or device is never read)")
    raise ConfigError(f"input not found: {text!r} (no such file, folder or matching glob)")


def _folder(p: Path, recursive: bool, options: InputOptions) -> list[Source]:
    if is_saved_dataset(p):
        return table_sources(saved_arrow_files(p), "arrow", options.image_column, options.id_column)
    out = walk_images(p, recursive)
    if out:
        return out
    tables = parquet_files_in(p)
    if tables:
        return table_sources(tables, "parquet", options.image_column, options.id_column)
    shown = ", ".join(sorted(image_extensions())[:12])
    raise ConfigError(f"folder {str(p)!r} holds no image files ({shown}, ... any format Pillow opens), no .parquet "
                      f"files and no saved dataset{'' if recursive else '; subfolders not searched'}")


def _file(p: Path, options: InputOptions) -> list[Source]:
    name = p.name.lower()
    if name.endswith(".txt"):
        return read_txt(p)
    if name.endswith(".json") or name.endswith(".jsonl"):
        if looks_like_llava(p):
            return llava_sources(p, options.image_root)
        return read_jsonl(p)
    if name.endswith(".tar") or name.endswith(COMPRESSED):
        return tar_sources([p])
    if name.endswith(".parquet"):
        return table_sources([(p.stem, p)], "parquet", options.image_column, options.id_column)
    if name.endswith(".arrow"):
        return table_sources([(p.stem, p)], "arrow", options.image_column, options.id_column)
    return [Source(p.name, absolute(p))]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: job I of N (``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: use I/N, e.g. --shard 0/4 (I counts from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N (I counts from 0)")
    return i, n


def shard_for_rank(sources: list[Source], rank: int, world_size: int) -> list[Source]:
    """Rank ``rank``'s share: every ``world_size``-th source of the id-sorted list, from ``rank``,
    returned in reading order (by file, then position in it), so tar shards and Parquet row groups
    are read front to back whatever the ids are.

    ``--shard I/N`` under W processes is global rank ``I * W + r`` of ``N * W``: together the jobs
    cover every source exactly once, and each rank's share never depends on the others.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    share = sorted(sources, key=lambda s: (s.id, s.name))[rank::world_size]
    return sorted(share, key=lambda s: (str(s.path), s.at, s.member, s.id))
