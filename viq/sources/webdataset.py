"""WebDataset shards (img2dataset, DataComp, LAION): uncompressed ``.tar`` files of samples.

A sample is the group of members sharing a key: the member name up to the first dot of its
base name (``00001/000010023.jpg`` -> key ``00001/000010023``, as webdataset splits it). Its image
is the first member whose extension is an image one (webdataset's ``jpg jpeg png ppm pgm pbm pnm
webp``, then any other Pillow image extension). Listing reads only the tar headers; the encoder
later reads each image as a byte range of the shard: nothing is extracted to disk.

Ids are the sample keys. When two shards of one input hold the same key, every id of that input
gets its shard's name in front (``shard-000003/000010023``), so no id is ambiguous.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from viq.errors import ConfigError
from viq.sources.base import Source, absolute
from viq.sources.files import image_extensions

#: webdataset's own image extensions, in its order of preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "pgm", "pbm", "pnm", "webp")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(text: str) -> list[str]:
    """``shard-{000000..000002}.tar`` -> three names; ``{a,b}`` -> two. Zero padding is kept."""
    m = _BRACE.search(text)
    if not m:
        return [text]
    head, body, tail = text[: m.start()], m.group(1), text[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [text[: m.end()] + s for s in expand_braces(tail)] if tail else [text]
    return [h + i + t for h in [head] for i in items for t in expand_braces(tail)]


def has_braces(text: str) -> bool:
    m = _BRACE.search(text)
    return bool(m) and (".." in m.group(1) or "," in m.group(1))


def sample_key(member: str) -> tuple[str, str]:
    """(key, extension) of a member name, webdataset's way: split at the first dot of the base name."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _rank(ext: str) -> int | None:
    if ext in WDS_IMAGE_EXTENSIONS:
        return WDS_IMAGE_EXTENSIONS.index(ext)
    if f".{ext}" in image_extensions():
        return len(WDS_IMAGE_EXTENSIONS)
    return None


def list_shard(path: Path) -> list[tuple[str, str, int, int]]:
    """(key, member name, data offset, size) of each sample's image in one shard, in tar order."""
    name = str(path)
    if name.lower().endswith(COMPRESSED):
        raise ConfigError(f"{name}: compressed tar shards cannot be read by byte range; decompress it "
                          "(e.g. `gunzip`/`zstd -d`) to a plain .tar, as img2dataset writes them")
    best: dict[str, tuple[int, str, int, int]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:  # headers only: member data is skipped by seeking
            for info in tar:
                if not info.isfile() or info.name.startswith("./."):
                    continue
                member = info.name[2:] if info.name.startswith("./") else info.name
                key, ext = sample_key(member)
                rank = _rank(ext)
                if rank is None or key.rsplit("/", 1)[-1] == "":
                    continue
                if key not in best:
                    order.append(key)
                if key not in best or rank < best[key][0]:
                    best[key] = (rank, member, info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"{name}: not a readable uncompressed tar shard ({e})") from None
    return [(k, best[k][1], best[k][2], best[k][3]) for k in order]


def tar_sources(shards: list[Path]) -> list[Source]:
    """Every sample image of these shards; ids are keys, prefixed with the shard name on a clash."""
    listed = [(p, list_shard(p)) for p in shards]
    keys = [k for _, rows in listed for k, *_ in rows]
    prefix = len(set(keys)) != len(keys)
    out = []
    for p, rows in listed:
        stem = p.name[: -len(".tar")] if p.name.endswith(".tar") else p.stem
        for key, member, offset, size in rows:
            out.append(Source(f"{stem}/{key}" if prefix else key, absolute(p), "tar", member, (offset, size)))
    if not out:
        raise ConfigError(f"{', '.join(map(str, shards[:3]))}: no image members "
                          f"({', '.join(WDS_IMAGE_EXTENSIONS)}, ...) in the tar shard(s)")
    return out
