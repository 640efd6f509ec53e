"""Weights in the Hugging Face cache: ``REPO_ID[@REVISION][:SUBFOLDER]`` resolved where
huggingface_hub keeps snapshots, so files fetched by any Hugging Face tool are reused and never
downloaded twice. huggingface_hub reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` itself;
this module reads no environment variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from viq.errors import HubError
from viq.hub import ModelEntry, Plan, _find_target, _hub_error, _missing_in, custom_entry, hub_offline

_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                       r"(?:@(?P<rev>[A-Za-z0-9._/-]+?))?(?::(?P<sub>[^:]+))?$")


def parse_repo_ref(text: str) -> tuple[str, str | None, str | None] | None:
    """``org/repo[@revision][:subfolder]`` -> (repo_id, revision, subfolder); None for anything else."""
    m = _REPO_REF.match(str(text))
    if m is None or ".." in (m.group("sub") or "").split("/"):
        return None
    return m.group("repo"), m.group("rev"), (m.group("sub") or "").strip("/") or None


def hub_cache_path(repo_id: str, revision: str | None = None, subfolder: str | None = None,
                   cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Path:
    """The folder (``subfolder`` of the repo's snapshot) in the Hugging Face cache.

    The cache is where huggingface_hub puts it (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``; ``cache_dir`` overrides). What is cached is used as it is; only a
    missing snapshot is fetched (only the subfolder's files), and never when offline
    (``HF_HUB_OFFLINE`` or ``offline``): then a HubError says what is missing and how to get it.
    """
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*"] if subfolder else None
    where = f"{repo_id}{'@' + revision if revision else ''}{':' + subfolder if subfolder else ''}"
    cached = _cached_snapshot(repo_id, revision, subfolder, cache_dir)
    if cached is not None:
        return cached
    if hub_offline() if offline is None else offline:
        include = f" --include '{subfolder}/*'" if subfolder else ""
        raise HubError(f"{where} is not in the Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE); "
                       f"on a machine with internet run `hf download {repo_id}{include}` and copy its cache "
                       "(HF_HUB_CACHE) here")
    plan = Plan(where, custom_entry(repo_id), Path(cache_dir or "."), revision or "main", tuple(patterns or ()), True)
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as exc:
        err = _hub_error(plan, exc)
        if err is None:
            raise
        raise err from exc
    target = snap / subfolder if subfolder else snap
    if not target.is_dir() or not any(target.iterdir()):
        raise HubError(f"{where}: the repo has no files under {subfolder!r}; check the subfolder name")
    return target


def _cached_snapshot(repo_id: str, revision: str | None, subfolder: str | None, cache_dir) -> Path | None:
    """The cached snapshot (or its subfolder) when it holds files; None otherwise. No network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        snap = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=[f"{subfolder}/*"] if subfolder else None))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    target = snap / subfolder if subfolder else snap
    if target.is_dir() and any(p.is_file() and not p.name.endswith(".incomplete") for p in target.rglob("*")):
        return target
    return None


def in_hub_cache(entry: ModelEntry) -> Path | None:
    """A known name's target inside its repo's cached snapshot (no network), or None."""
    try:
        snap = _cached_snapshot(entry.repo_id, None if entry.revision == "main" else entry.revision, None, None)
    except Exception:  # a broken cache is the same as no cache here
        return None
    if snap is None:
        return None
    target = _find_target(entry, snap)
    return target if target is not None and not _missing_in(entry, target) else None
