"""Progress of a download as plain lines: what will be fetched, then each file as it lands.

Why: huggingface_hub draws tqdm bars, which it turns off when stderr is not a terminal (a log, a
SLURM job, a pipe), so a multi-GB download there is silent for minutes. This module watches the
download folder from a thread instead of hooking the hub's bars (whose classes change between
releases): a planned file is done once it sits at its place with its size (the hub writes into
``.cache/huggingface/download/*.incomplete`` and renames), and the bytes of unfinished files are
those ``.incomplete`` files. It never prints: lines go to the ``say`` callback the caller gives.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Sequence

#: where huggingface_hub keeps partial files of a ``local_dir`` download
PARTIAL_DIR = Path(".cache") / "huggingface" / "download"


def human_bytes(n: int | None) -> str:
    """``1.2 GB`` (powers of 1000, as the Hub shows sizes); ``?`` when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "?"


def plan_line(name: str, repo: str, folder: Path, files: Sequence) -> str:
    """One line saying what a download will fetch: files still to get, their total size, what is here.

    ``files`` are ``viq.hub.RemoteFile`` (``path``, ``size`` or None, ``present``).
    """
    todo = [f for f in files if not f.present]
    here = len(files) - len(todo)
    sizes = [f.size for f in todo]
    total = human_bytes(sum(sizes)) if None not in sizes else "size unknown"
    if not files:
        return f"{name}: {repo} -> {folder}: no file matches the patterns"
    if not todo:
        return f"{name}: {repo} -> {folder}: all {len(files)} file(s) already here; checking them"
    already = f" ({here} already here)" if here else ""
    return f"{name}: {repo} -> {folder}: fetching {len(todo)} file(s), {total}{already}"


class DownloadWatch:
    """Reports files of ``files`` (``RemoteFile``) landing in ``folder``: a line per finished file,
    a byte-count line at most every ``every_s`` seconds while none finishes, and a closing line.

    Use as a context manager around the transfer (a daemon thread polls every ``poll_s``), or call
    ``poll()`` yourself.
    """

    def __init__(self, name: str, folder: Path, files: Sequence, say: Callable[[str], None],
                 every_s: float = 10.0, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.folder = Path(folder)
        self.todo = [f for f in files if not f.present]
        self.say = say
        self.every_s = every_s
        self.poll_s = poll_s
        self.clock = clock
        self.done: set[str] = set()
        self.start = self.last = clock()
        self.total = sum(f.size for f in self.todo) if all(f.size is not None for f in self.todo) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _landed(self, f) -> bool:
        p = self.folder / f.path
        try:
            return p.is_file() and (f.size is None or p.stat().st_size == f.size)
        except OSError:
            return False

    def _bytes(self) -> int:
        got = sum(f.size or 0 for f in self.todo if f.path in self.done)
        partial = self.folder / PARTIAL_DIR
        if partial.is_dir():
            for p in partial.rglob("*.incomplete"):
                try:
                    got += p.stat().st_size
                except OSError:  # finished (renamed) while we looked
                    pass
        return got

    def _status(self) -> str:
        got = self._bytes()
        of = f" of {human_bytes(self.total)}" if self.total else ""
        pct = f" ({100 * got / self.total:.0f}%)" if self.total else ""
        return (f"{len(self.done)}/{len(self.todo)} files, {human_bytes(got)}{of}{pct}, "
                f"{self.clock() - self.start:.0f} s")

    def poll(self) -> list[str]:
        """Say (and return) the lines due now: one per newly finished file, else a periodic status."""
        lines = []
        for f in self.todo:
            if f.path not in self.done and self._landed(f):
                self.done.add(f.path)
                lines.append(f"{self.name}: got {f.path} ({human_bytes(f.size)}) [{self._status()}]")
        if not lines and self.clock() - self.last >= self.every_s and len(self.done) < len(self.todo):
            lines.append(f"{self.name}: downloading [{self._status()}]")
        if lines:
            self.last = self.clock()
        for line in lines:
            self.say(line)
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __enter__(self) -> "DownloadWatch":
        if self.todo:
            self._thread = threading.Thread(target=self._run, name="viq-download-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.todo:
            return
        self.poll()  # files that landed since the last look
        if exc_type is None:
            self.say(f"{self.name}: fetched {len(self.done)} file(s), {human_bytes(self._bytes())} "
                     f"in {self.clock() - self.start:.1f} s")
        else:
            self.say(f"{self.name}: stopped after {len(self.done)} of {len(self.todo)} file(s); "
                     "partial files are kept and the next run resumes them")
