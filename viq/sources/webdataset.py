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


class _Unusual(Exception):
    """A header the quick reader does not handle: tarfile reads the shard instead."""


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (members over 8 GiB)
        n = int.from_bytes(field[1:], "big")
        return n if field[:1] == b"\x80" else n - (1 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value
        pos += length
    return out


def _quick_members(path: Path):
    """(name, data offset, size) of each regular member, reading only the 512-byte headers.

    Handles ustar, GNU long names and PAX headers; a header whose checksum is wrong is a
    ConfigError (tarfile would silently stop listing there); other oddities raise ``_Unusual``.
    """
    with open(path, "rb") as f:
        pos, long_name, pax = 0, None, {}
        while True:
            f.seek(pos)
            hdr = f.read(512)
            if len(hdr) < 512 or hdr == bytes(512):
                return
            try:
                stored = _number(hdr[148:156])
            except ValueError:
                stored = -1  # not even a number: damaged
            if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                what = "not a tar file" if pos == 0 else f"damaged tar header at byte {pos}"
                raise ConfigError(f"{path}: {what} (header checksum wrong); the shard is corrupt or not a "
                                  "plain .tar: fetch it again")
            kind, size = hdr[156:157], _number(hdr[124:136])
            data = pos + 512
            pos = data + (size + 511) // 512 * 512
            if kind in (b"L", b"x"):
                f.seek(data)
                payload = f.read(size)
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0]
                else:
                    pax = _pax(payload)
                continue
            if kind in (b"g", b"K"):
                continue
            name = hdr[:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            name = pax.get("path", long_name or name)
            if "size" in pax:
                size = int(pax["size"])
                pos = data + (size + 511) // 512 * 512
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7"):
                yield name.decode("utf-8", "surrogateescape"), data, size


def _tarfile_members(path: Path):
    with tarfile.open(path, mode="r:") as tar:  # headers only: member data is skipped by seeking
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size


def list_shard(path: Path) -> list[tuple[str, str, int, int]]:
    """(key, member name, data offset, size) of each sample's image in one shard, in tar order."""
    name = str(path)
    if name.lower().endswith(COMPRESSED):
        raise ConfigError(f"{name}: compressed tar shards cannot be read by byte range; decompress it "
                          "(e.g. `gunzip`/`zstd -d`) to a plain .tar, as img2dataset writes them")
    try:
        try:
            return _samples(_quick_members(path))
        except (_Unusual, ValueError, IndexError):
            return _samples(_tarfile_members(path))
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"{name}: not a readable uncompressed tar shard ({e})") from None


def _samples(members) -> list[tuple[str, str, int, int]]:
    best: dict[str, tuple[int, str, int, int]] = {}
    order: list[str] = []
    for member, offset, size in members:
        if member.startswith("./"):
            member = member[2:]
        key, ext = sample_key(member)
        rank = _rank(ext)
        if rank is None or key.rsplit("/", 1)[-1] == "" or key.startswith("."):
            continue
        if key not in best:
            order.append(key)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, member, offset, size)
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
