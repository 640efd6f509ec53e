"""What one input image is (``Source``) and how its bytes are read, whatever holds them.

A source names where its bytes live: a plain file, a member of an uncompressed tar shard
(byte range), a row of a Parquet / Arrow file, or a byte range of a packed file. Listing inputs
never reads image bytes; the encoder reads each source once, in worker threads, through a
``SourceReader``. Only regular files are opened (never a FIFO, device or socket, which could block
or never end), and no source may be larger than ``max_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from viq.errors import ImageError

#: Largest image file read by default (1 GiB): far above any real photo, far below "the disk".
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Source:
    """One image to encode: ``id`` is its stable key in the code store, ``path`` is absolute.

    ``kind`` says how ``path`` holds the bytes: ``file`` (the image itself), ``tar`` and ``packed``
    (``at`` = (offset, length) in ``path``), ``packed-base64`` (that range is base64 text),
    ``parquet`` / ``arrow`` (``member`` = the image column, ``at`` = (batch or row group, row)).
    """

    id: str
    path: Path
    kind: str = "file"
    member: str = ""
    at: tuple = ()

    @property
    def name(self) -> str:
        """Where the image is, for the store's ``source`` column and for messages."""
        if self.kind == "file":
            return str(self.path)
        if self.kind == "tar":
            return f"{self.path}#{self.member}"
        if self.kind in ("parquet", "arrow"):
            return f"{self.path}#{self.member}[{self.id}]"
        return f"{self.path}@{self.at[0]}"

    @property
    def locator(self) -> tuple:
        """Everything that says where the bytes are: two sources with equal locators are one image."""
        return (str(self.path), self.kind, self.member, self.at)


def _error(name: str, reason: str) -> ImageError:
    err = ImageError(f"{name}: {reason}")
    err.source, err.reason = name, reason
    return err


def open_regular(path, name: str | None = None):
    """Open ``path`` for reading only if it is a regular file; ImageError naming it otherwise.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the fstat
    check then refuses it (and devices such as a symlink to /dev/zero, and sockets).
    """
    name = name or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _error(name, "cannot read (no such file)") from None
    except IsADirectoryError:
        raise _error(name, "is a directory, not an image file") from None
    except PermissionError:
        raise _error(name, "cannot read (permission denied)") from None
    except OSError as e:
        raise _error(name, f"cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _error(name, "is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise _error(name, "not a regular file (a FIFO, device or socket); only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_range(path, offset: int, length: int, max_bytes: int, name: str) -> bytes:
    """``length`` bytes at ``offset`` of a regular file; ImageError when short or too large."""
    if length > max_bytes:
        raise _error(name, f"{length} bytes exceeds the limit of {max_bytes} bytes per image")
    fp, size = open_regular(path, name)
    with fp:
        if offset + length > size:
            raise _error(name, f"byte range {offset}+{length} runs past the end of {path} ({size} bytes)")
        fp.seek(offset)
        data = fp.read(length)
    if len(data) != length:
        raise _error(name, f"truncated: read {len(data)} of {length} bytes")
    return data


def read_file(path, max_bytes: int, name: str | None = None) -> bytes:
    """A whole regular file, at most ``max_bytes`` (a file still growing is cut off and refused)."""
    name = name or str(path)
    fp, size = open_regular(path, name)
    with fp:
        if size > max_bytes:
            raise _error(name, f"{size} bytes exceeds the limit of {max_bytes} bytes per image")
        # read what fstat saw (+1 to notice growth): asking for max_bytes + 1 at once makes Python
        # allocate that much (1 GiB by default) for every file, a third of a small image's read time
        data = fp.read(size + 1)
        if len(data) > size:  # grew since fstat: read on, up to the cap
            data += fp.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise _error(name, f"more than {max_bytes} bytes (the file grew while read)")
    return data


class SourceReader:
    """Reads sources' bytes; thread-safe. Keeps the last few Parquet/Arrow batches it decoded,
    so rows read in order cost one batch read per batch, not one per row."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, cache_batches: int = 4):
        self.max_bytes = max_bytes
        self.cache_batches = cache_batches
        self._lock = threading.Lock()
        self._batches: OrderedDict = OrderedDict()

    def read(self, src: Source) -> bytes:
        """The image's bytes; ImageError naming the source for every way it can be unreadable."""
        if src.kind == "file":
            return read_file(src.path, self.max_bytes, src.name)
        if src.kind in ("tar", "packed"):
            return read_range(src.path, src.at[0], src.at[1], self.max_bytes, src.name)
        if src.kind == "packed-base64":
            text = read_range(src.path, src.at[0], src.at[1], self.max_bytes, src.name)
            try:
                return base64.b64decode(text, validate=False)
            except (binascii.Error, ValueError) as e:
                raise _error(src.name, f"not valid base64 ({e})") from None
        if src.kind in ("parquet", "arrow"):
            return self._read_row(src)
        raise _error(src.name, f"unknown source kind {src.kind!r}")

    def _read_row(self, src: Source) -> bytes:
        from viq.sources.tables import cell_bytes, read_batch

        group, row = src.at
        key = (str(src.path), src.kind, src.member, group)
        with self._lock:
            column = self._batches.get(key)
            if column is None:
                column = read_batch(src.path, src.kind, src.member, group, src.name)
                self._batches[key] = column
                if len(self._batches) > self.cache_batches:
                    self._batches.popitem(last=False)
            else:
                self._batches.move_to_end(key)
        data = cell_bytes(column, row, src, self.max_bytes)
        if data is None:
            raise _error(src.name, "the image cell is empty (null)")
        return data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (provenance of an input image).

    An unreadable file raises the plain ``OSError``: the caller decides whose fault it is.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def absolute(p) -> Path:
    return Path(os.path.abspath(p))  # abspath, not resolve: keep symlinked names the user chose
