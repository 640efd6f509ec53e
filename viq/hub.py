"""Weights by name: a table of known models, downloads through huggingface_hub, a local registry.

A models directory holds one folder per Hub repo, named as the reference README names them
(``siglip2_g_384_16/``, ``Qwen2.5-0.5B/``, ``Qwen-Image/``, ``ViQ_weights/``), plus
``registry.json`` (name -> where it lives, repo, revision, files, time). ``resolve_model`` turns a
name into the path a loader wants; ``download`` fetches only the files a name needs;
``import_weights`` registers weights a user already has. ``REPO_ID[@REVISION][:SUBFOLDER]`` (and a
known name not in the models directory) resolves through the Hugging Face cache (``viq.hf_cache``),
so weights fetched by any Hugging Face tool are reused and never downloaded twice.

huggingface_hub does the transfers: it resumes interrupted files, and it honours ``HF_TOKEN``,
``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` itself. This module reads no environment variable.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from viq.errors import HubError

REGISTRY = "registry.json"
VIQ_REPO = "XuminYu/ViQ_weights"
VIQ_SIZES = ("2k", "4k", "8k", "16k", "64k")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HUB_META = ".cache"  # huggingface_hub keeps its resume metadata in <local_dir>/.cache/huggingface


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable thing.

    ``target``: where, relative to ``folder``, the path ``resolve_model`` returns may sit (first
    existing wins; ``""`` is the folder itself). ``required``: files relative to that target that
    must exist, ``a|b`` meaning either. ``next_step``: what to run afterwards, ``{path}`` filled in.
    """

    name: str
    repo_id: str
    folder: str
    allow_patterns: tuple[str, ...] | None
    revision: str
    description: str
    kind: str  # "vit" | "llm" | "vae" | "viq"
    size_bytes: int | None = None
    target: tuple[str, ...] = ("",)
    required: tuple[str, ...] = ()
    next_step: str | None = None


# Every revision is "main": the commit hashes could not be checked when this table was written.
# Pin a hash here once known (`viqctl download NAME --dry-run` prints the commit it resolves to).
_PIN = "main"
_LLM_FILES = ("*.json", "*.safetensors", "*.txt", "LICENSE*", "README.md")
_OPEN_CLIP = ("open_clip_config.json", "open_clip_model.safetensors")  # the .bin twin is the same tensors
_OPEN_CLIP_REQUIRED = ("open_clip_config.json", "open_clip_model.safetensors|open_clip_pytorch_model.bin")
# Sizes are approximate: Qwen from parameter count x 2 bytes (bf16); ViQ from reference-inference.md §8
# (encoder float32, embedder and drawer bf16); SigLIP2 So400m from the sibling -256 repo's file.
_QWEN = {"0.5b": ("0.5B", 988_000_000), "1.5b": ("1.5B", 3_090_000_000),
         "3b": ("3B", 6_170_000_000), "7b": ("7B", 15_230_000_000), "14b": ("14B", 29_540_000_000),
         "32b": ("32B", 65_530_000_000), "72b": ("72B", 145_410_000_000)}


def _known_models() -> dict[str, ModelEntry]:
    stage1 = ("name it in a recipe (teacher.ckpt, or stage 1's init.ckpt); training resizes its "
              "24x24 position grid to the student's 128x128 when it loads it")
    entries = [
        ModelEntry("siglip2-so400m", "timm/ViT-SO400M-16-SigLIP2-384", "siglip2_so400m_384_16", _OPEN_CLIP,
                   _PIN, "SigLIP2 So400m/16 @384, open_clip weights (teacher / So400m student start)", "vit",
                   4_540_000_000, required=_OPEN_CLIP_REQUIRED, next_step=stage1),
        ModelEntry("siglip2-g", "timm/ViT-gopt-16-SigLIP2-384", "siglip2_g_384_16", _OPEN_CLIP,
                   _PIN, "SigLIP2 giant-opt/16 @384, open_clip weights (teacher; stage-1 start)", "vit",
                   None, required=_OPEN_CLIP_REQUIRED, next_step=stage1),
        ModelEntry("viq-anyres-vit-g", VIQ_REPO, "ViQ_weights",
                   ("anyres_vit/giant1b/siglip2_g_anyres_s4.pth", "*/anyres_vit/giant1b/siglip2_g_anyres_s4.pth"),
                   _PIN, "stage-1 any-res SigLIP2-g ViT: the released training recipe's starting point", "vit",
                   None, target=("anyres_vit/giant1b/siglip2_g_anyres_s4.pth",
                                 "*/anyres_vit/giant1b/siglip2_g_anyres_s4.pth")),
    ]
    for key, (label, size) in _QWEN.items():
        for suffix, tag, what in (("", "", "base"), ("-instruct", "-Instruct", "instruct")):
            entries.append(ModelEntry(f"qwen2.5-{key}{suffix}", f"Qwen/Qwen2.5-{label}{tag}", f"Qwen2.5-{label}{tag}",
                                      _LLM_FILES, _PIN, f"Qwen2.5 {label} {what} LLM", "llm", size,
                                      required=("config.json", "*.safetensors")))
    entries.append(ModelEntry("qwen-image-vae", "Qwen/Qwen-Image", "Qwen-Image", ("vae/*",), _PIN,
                              "Qwen-Image VAE only (the drawer's decoder), not the 20B pipeline", "vae",
                              254_000_000, target=("vae",), required=("config.json", "*.safetensors")))
    entries.append(ModelEntry("dinov2-base", "facebook/dinov2-base", "dinov2-base",
                              ("config.json", "*.safetensors"), _PIN,
                              "DINOv2-base, REPA target of the decoder stage (viq.eval.perceptual.load_dinov2)", "vit",
                              346_000_000, required=("config.json", "*.safetensors")))
    for size in VIQ_SIZES:
        # The repo may keep the sizes at its root or under one folder (the README's ".../ViQ_weights/ViQ").
        entries.append(ModelEntry(
            f"viq-{size}", VIQ_REPO, "ViQ_weights", (f"converted_{size}/*", f"*/converted_{size}/*"), _PIN,
            f"ViQ {size} FSQ tokenizer, reference layout (encoder, embedder, drawer)", "viq", 7_490_000_000,
            target=(f"converted_{size}", f"*/converted_{size}"),
            required=(f"model_viq_fsq_{size}.pth", "embedder.pth", "index_drawer.pth"),
            next_step="viqctl verify {path}"))
    return {e.name: e for e in entries}


KNOWN_MODELS: dict[str, ModelEntry] = _known_models()


def default_models_dir(path: str | os.PathLike | None = None) -> Path:
    """``path`` when given (the CLI passes ``--dir`` or ``VIQ_MODELS_DIR``), else ``~/.cache/viq/models``."""
    return Path(path).expanduser() if path else Path.home() / ".cache" / "viq" / "models"


def hub_offline() -> bool:
    """huggingface_hub's own offline switch (it reads HF_HUB_OFFLINE at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------- plans and local state


@dataclass(frozen=True)
class Plan:
    """What one name will fetch and where it will land."""

    name: str
    entry: ModelEntry
    models_dir: Path
    revision: str
    allow_patterns: tuple[str, ...] | None
    custom_patterns: bool  # --include replaced the table's patterns: only "something matched" is checked

    @property
    def repo_id(self) -> str:
        return self.entry.repo_id

    @property
    def folder(self) -> Path:
        return self.models_dir / self.entry.folder


def custom_entry(repo_id: str) -> ModelEntry:
    """An ``org/repo`` outside the table: the folder is the repo's own name, as the docs do for Qwen."""
    return ModelEntry(repo_id, repo_id, repo_id.split("/")[-1], None, _PIN, f"{repo_id} (custom)", "custom")


def plan_download(name: str, models_dir: str | os.PathLike | None = None, revision: str | None = None,
                  include: list[str] | tuple[str, ...] | None = None) -> Plan:
    """Look ``name`` up (known name or ``org/repo``); ``include`` replaces its allow patterns."""
    if name in KNOWN_MODELS:
        entry = KNOWN_MODELS[name]
    elif "/" in name and _NAME_RE.match(name):
        entry = custom_entry(name)
    else:
        raise HubError(f"unknown model name {name!r}: known names are {', '.join(sorted(KNOWN_MODELS))}; "
                       "or give a Hub repo as org/repo with --include PATTERN (see `viqctl download --list`)")
    root = default_models_dir(models_dir)
    _check_folder_free(entry, root)
    return Plan(name, entry, root, revision or entry.revision,
                tuple(include) if include else entry.allow_patterns, bool(include))


def _check_folder_free(entry: ModelEntry, root: Path) -> None:
    """Two different repos must never share a folder (a custom repo named like a known one)."""
    owners = {e.folder: e.repo_id for e in KNOWN_MODELS.values()}
    owners.update({r.get("folder"): r["repo_id"] for r in load_registry(root).values() if r.get("repo_id")})
    other = owners.get(entry.folder)
    if other and other != entry.repo_id:
        raise HubError(f"{entry.name}: folder {root / entry.folder} already belongs to {other}; "
                       "use another --dir for this repo")


def _matches(path: str, patterns) -> bool:
    # Same rule as huggingface_hub's filter: fnmatch, and "dir/" means everything below it.
    return patterns is None or any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns)


def _find_target(entry: ModelEntry, folder: Path) -> Path | None:
    for rel in entry.target:
        hits = sorted(folder.glob(rel)) if rel else [folder]
        for hit in hits:
            if hit.exists() and not _missing_in(entry, hit):
                return hit
    for rel in entry.target:  # nothing complete: the first that exists, so the missing list is exact
        hits = sorted(folder.glob(rel)) if rel else [folder]
        if hits and hits[0].exists():
            return hits[0]
    return None


def _missing_in(entry: ModelEntry, target: Path) -> list[str]:
    """Required files absent under ``target``, plus shards a ``*.index.json`` names but lacks."""
    missing = []
    for req in entry.required:
        if not any(list(target.glob(alt)) for alt in req.split("|")):
            missing.append(req)
    if target.is_dir():
        for index in target.glob("*.index.json"):
            try:
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError):
                missing.append(f"{index.name} (unreadable)")
                continue
            missing += sorted(s for s in shards if not (target / s).exists())
    return missing


def _local_files(folder: Path, patterns) -> list[str]:
    """Files under ``folder`` (POSIX, relative) that the patterns select; hub metadata excluded."""
    found = []
    for top, dirs, names in os.walk(folder, followlinks=True):  # --import --link makes symlinked dirs
        rel_top = Path(top).relative_to(folder).as_posix()
        if rel_top == ".":
            dirs[:] = [d for d in dirs if d != _HUB_META]
        for n in names:
            rel = n if rel_top == "." else f"{rel_top}/{n}"
            if _matches(rel, patterns):
                found.append(rel)
    return sorted(found)


def missing_files(plan: Plan) -> list[str]:
    """What is still absent locally for ``plan`` (paths relative to its folder); empty when complete."""
    if plan.custom_patterns or (not plan.entry.required and plan.entry.target == ("",)):
        if _local_files(plan.folder, plan.allow_patterns):
            return _unfinished(plan.folder)
        return [f"files matching {', '.join(plan.allow_patterns or ('*',))}"]
    target = _find_target(plan.entry, plan.folder)
    if target is None:
        base = plan.entry.target[0]
        return [f"{base}/{r}" if base else r for r in plan.entry.required] or [base]
    rel = target.relative_to(plan.folder).as_posix()
    missing = [f"{rel}/{m}" if rel != "." else m for m in _missing_in(plan.entry, target)]
    return missing + [m for m in _unfinished(plan.folder) if m not in missing]


def _unfinished(folder: Path) -> list[str]:
    """Signs of an interrupted transfer anywhere in ``folder``: huggingface_hub's ``*.incomplete``
    files, and shards that a ``*.index.json`` names but that are not there."""
    out = []
    meta = folder / _HUB_META
    if meta.is_dir():
        for part in sorted(meta.rglob("*.incomplete")):
            out.append(f"{part.relative_to(meta).as_posix()} (partial transfer)")
    for index in sorted(folder.rglob("*.index.json")):
        if meta in index.parents:
            continue
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            out.append(f"{index.relative_to(folder).as_posix()} (unreadable)")
            continue
        base = index.parent.relative_to(folder).as_posix()
        out += sorted(f"{s}" if base == "." else f"{base}/{s}" for s in shards if not (index.parent / s).exists())
    return out


def _show(missing: list[str]) -> str:
    shown = ", ".join(m.replace("|", " or ") for m in missing[:10])
    return shown + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")


# ---------------------------------------------------------------- registry


def load_registry(models_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """name -> record from ``<models_dir>/registry.json``; empty when there is none yet."""
    path = default_models_dir(models_dir) / REGISTRY
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["models"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HubError(f"cannot read the model registry {path}: {exc}. Fix or delete it; "
                       "`viqctl download NAME` rewrites entries") from exc


def _register(models_dir: Path, name: str, record: dict) -> None:
    """Add one record; temp file + os.replace so a crash never leaves half a registry."""
    models = load_registry(models_dir)
    models[name] = record
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".tmp", dir=models_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "models": dict(sorted(models.items()))}, f, indent=2)
            f.write("\n")
        os.replace(tmp, models_dir / REGISTRY)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- download, dry run, import


@dataclass
class DownloadResult:
    """The outcome for one name: ``path`` is what ``resolve_model`` will return for it."""

    name: str
    repo_id: str
    revision: str
    status: str  # "downloaded" | "present" | "imported"
    path: Path
    files: list[str]
    bytes: int
    next_step: str | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


@dataclass
class RemoteFile:
    path: str
    size: int | None
    present: bool  # already in the local folder with the same size


@dataclass
class DryRun:
    """What ``download`` would fetch: the matching files in the repo at ``commit`` and their bytes."""

    name: str
    repo_id: str
    revision: str
    commit: str | None
    folder: Path
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.present)

    def to_dict(self) -> dict:
        return {"name": self.name, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "folder": str(self.folder), "total_bytes": self.total_bytes, "missing_bytes": self.missing_bytes,
                "files": [f.__dict__ for f in self.files]}


def _how_to_get(plan: Plan) -> str:
    return (f"On a machine with internet run `viqctl download {plan.name}` (or `hf download {plan.repo_id}`), "
            f"copy the result here and run `viqctl download --import PATH --name {plan.name}`")


def _offline_error(plan: Plan, reason: str) -> HubError:
    return HubError(f"{plan.name}: {reason}; missing in {plan.folder}: {_show(missing_files(plan))}. "
                    + _how_to_get(plan))


def _is_connection_error(exc: BaseException) -> bool:
    # requests, httpx and the hub's own OfflineModeIsEnabled all say so in their class names.
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(
        "Connect" in c.__name__ or "Timeout" in c.__name__ or c.__name__ == "TransportError"
        for c in type(exc).__mro__)


def _hub_error(plan: Plan, exc: BaseException) -> HubError | None:
    """Translate what huggingface_hub raises into one line that says what to do; None if unknown."""
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{plan.name} ({plan.repo_id}@{plan.revision})"
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where}: the repo is gated; accept its terms on the Hub and set HF_TOKEN "
                        "(or run `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{where}: repo not found, or private (set HF_TOKEN if you have access)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: revision {plan.revision!r} not found; pass an existing --revision")
    if isinstance(exc, LocalEntryNotFoundError) or _is_connection_error(exc):
        return _offline_error(plan, f"cannot reach the Hub ({type(exc).__name__})")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"{where}: the Hub answered with an error: {exc}")
    if isinstance(exc, OSError):
        return HubError(f"{where}: cannot write under {plan.folder}: {exc}")
    return None


def download(plan: Plan, offline: bool | None = None, say: Callable[[str], None] | None = None,
             file_lines: bool = False) -> DownloadResult:
    """Fetch what ``plan`` names into its folder and register it.

    Online, huggingface_hub is always asked (it skips files already complete and resumes partial
    ones). ``offline`` (None: follow huggingface_hub's HF_HUB_OFFLINE) never touches the network:
    a complete local copy is registered, anything missing is a HubError naming the files. The
    registry is written only after every required file is present.

    With ``say``, the Hub's file list is read first and one line says what will be fetched (files,
    total size); with ``file_lines`` too, a line per finished file and a periodic byte count follow
    (for logs, where the hub's own bars are off). See ``viq.hub_progress``.
    """
    offline = hub_offline() if offline is None else offline
    if offline:
        if missing_files(plan):
            raise _offline_error(plan, "offline (HF_HUB_OFFLINE or --offline) and not downloaded yet")
        status = "present"
    else:
        from huggingface_hub import snapshot_download

        from viq.hub_progress import DownloadWatch, plan_line

        watch = nullcontext()
        if say is not None:
            files = dry_run(plan, offline=False).files  # names and sizes; its errors are the transfer's
            say(plan_line(plan.name, f"{plan.repo_id}@{plan.revision}", plan.folder, files))
            if file_lines:
                watch = DownloadWatch(plan.name, plan.folder, files, say)
        try:
            with watch:
                snapshot_download(plan.repo_id, revision=plan.revision, local_dir=str(plan.folder),
                                  allow_patterns=list(plan.allow_patterns) if plan.allow_patterns else None)
        except Exception as exc:
            err = _hub_error(plan, exc)
            if err is None:
                raise
            raise err from exc
        missing = missing_files(plan)
        if missing:
            raise HubError(f"{plan.name}: {plan.repo_id}@{plan.revision} has no {_show(missing)} "
                           f"(patterns: {', '.join(plan.allow_patterns or ('*',))}); check --include/--revision")
        status = "downloaded"
    return _record(plan, status)


def _record(plan: Plan, status: str, source: str | None = None, linked: bool = False) -> DownloadResult:
    files = _local_files(plan.folder, plan.allow_patterns)
    size = sum((plan.folder / f).stat().st_size for f in files)
    path = _find_target(plan.entry, plan.folder) or plan.folder
    _register(plan.models_dir, plan.name, {
        "path": path.relative_to(plan.models_dir).as_posix(), "folder": plan.entry.folder,
        "repo_id": plan.repo_id, "revision": plan.revision,
        "allow_patterns": list(plan.allow_patterns) if plan.allow_patterns else None,
        "files": files, "bytes": size, "source": source or "download", "linked": linked, "time": _now(),
    })
    step = plan.entry.next_step.format(path=path) if plan.entry.next_step else None
    return DownloadResult(plan.name, plan.repo_id, plan.revision, status, path, files, size, step)


def dry_run(plan: Plan, offline: bool | None = None) -> DryRun:
    """List the repo files the plan would fetch, with sizes, without downloading anything."""
    if hub_offline() if offline is None else offline:
        raise _offline_error(plan, "--dry-run needs the Hub, and it is offline (HF_HUB_OFFLINE or --offline)")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(plan.repo_id, revision=plan.revision, files_metadata=True)
    except Exception as exc:
        err = _hub_error(plan, exc)
        if err is None:
            raise
        raise err from exc
    result = DryRun(plan.name, plan.repo_id, plan.revision, getattr(info, "sha", None), plan.folder)
    for sib in sorted(info.siblings or [], key=lambda s: s.rfilename):
        if _matches(sib.rfilename, plan.allow_patterns):
            local = plan.folder / sib.rfilename
            present = local.is_file() and (sib.size is None or local.stat().st_size == sib.size)
            result.files.append(RemoteFile(sib.rfilename, sib.size, present))
    return result


def import_weights(path: str | os.PathLike, name: str, models_dir: str | os.PathLike | None = None,
                   link: bool = False) -> DownloadResult:
    """Register weights a user already has, by copying (default) or symlinking (``link``) them in.

    For a known name ``path`` is either what ``resolve_model`` returns (e.g. a ``converted_16k``
    directory, the ``vae`` folder, the ``.pth`` file) or a folder holding it at its usual place; the
    required files are checked first. Any other name is taken as it is, placed under its own folder.
    """
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise HubError(f"--import {path}: no such file or directory")
    if not _NAME_RE.match(name):
        raise HubError(f"--name {name!r}: use letters, digits, '.', '_', '-' (optionally org/repo)")
    root = default_models_dir(models_dir)
    if name in KNOWN_MODELS:
        entry = KNOWN_MODELS[name]
        found = _import_source(entry, src)
        if found is None:
            want = ", ".join(entry.required) or entry.target[0]
            raise HubError(f"--import {src}: does not hold {name} (expected {want} there or at "
                           f"{' or '.join(t for t in entry.target if t)} below it)")
        src, rel = found
    else:
        rel = src.name if src.is_file() else ""
        entry = ModelEntry(name, "", name.split("/")[-1], None, "", f"imported {name}", "custom",
                           target=(rel,))
    _check_folder_free(entry, root)
    dest = root / entry.folder / rel if rel else root / entry.folder
    if dest.exists() or dest.is_symlink():
        if dest.resolve() != src:  # the same thing (already in place, or our own link) is just registered
            raise HubError(f"{name}: {dest} already exists; remove it first or use another --dir")
    else:
        _place(src, dest, link)
    plan = Plan(name, entry, root, "local", _import_patterns(entry, rel), False)
    return _record(plan, "imported", source=str(src), linked=link)


def _import_patterns(entry: ModelEntry, rel: str) -> tuple[str, ...] | None:
    """Which files of the folder belong to this name (for the registry's file list)."""
    if entry.allow_patterns is not None:
        return entry.allow_patterns
    return (rel, f"{rel}/*") if rel else None


def _import_source(entry: ModelEntry, src: Path) -> tuple[Path, str] | None:
    """(the thing to place, its path relative to the entry's folder) or None if ``src`` lacks it."""
    if src.is_dir() and not _missing_in(entry, src) and (entry.required or entry.target == ("",)):
        return src, entry.target[0]
    if src.is_file() and any(fnmatch.fnmatch(src.name, Path(t).name) for t in entry.target if t) \
            and not entry.required:
        return src, entry.target[0]
    if src.is_dir():
        found = _find_target(entry, src)
        if found is not None and found != src and not _missing_in(entry, found):
            return found, found.relative_to(src).as_posix()
    return None


def _place(src: Path, dest: Path, link: bool) -> None:
    """Symlink, or copy under a temp name then rename, so a killed copy never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        dest.symlink_to(src, target_is_directory=src.is_dir())
        return
    tmp = dest.with_name(f".{dest.name}.importing")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


# ---------------------------------------------------------------- lookup


@dataclass
class ModelStatus:
    """One row of ``--list``: a known or registered name and whether it is on disk."""

    name: str
    kind: str
    repo_id: str
    allow_patterns: list[str] | None
    size_bytes: int | None
    description: str
    present: bool
    path: str | None


def list_models(models_dir: str | os.PathLike | None = None) -> list[ModelStatus]:
    """Every known name, then registered custom names, with local presence."""
    root = default_models_dir(models_dir)
    registry = load_registry(root)
    rows = []
    for name in list(KNOWN_MODELS) + sorted(set(registry) - set(KNOWN_MODELS)):
        entry = KNOWN_MODELS.get(name)
        rec = registry.get(name, {})
        try:
            path = _lookup(name, root)
        except HubError:
            path = None
        rows.append(ModelStatus(
            name, entry.kind if entry else "custom", entry.repo_id if entry else rec.get("repo_id", ""),
            list(entry.allow_patterns) if entry and entry.allow_patterns else rec.get("allow_patterns"),
            entry.size_bytes if entry else rec.get("bytes"), entry.description if entry else "registered",
            path is not None, str(path) if path else None))
    return rows


def resolve_model(name_or_path: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path:
    """The path a loader should open for ``name_or_path``.

    An existing path is returned as given (it wins over a name). A registered name returns its
    recorded path; a known name found complete in the models directory returns it too. What comes
    back: ``viq-<size>`` -> the ``converted_<size>`` directory (reference layout:
    ``model_viq_fsq_<size>.pth``, ``embedder.pth``, ``index_drawer.pth``); ``qwen-image-vae`` -> the
    ``vae`` folder; ``viq-anyres-vit-g`` -> the ``.pth`` file; SigLIP2, Qwen and custom repos -> their folder.
    """
    given = Path(name_or_path).expanduser()
    if given.exists():
        return given
    text, root = str(name_or_path), default_models_dir(models_dir)
    from viq.hf_cache import hub_cache_path, parse_repo_ref

    ref = parse_repo_ref(text)
    if ref is not None and text not in load_registry(root) and text not in KNOWN_MODELS:
        return hub_cache_path(*ref)
    return _lookup(text, root, explicit_dir=models_dir is not None)


def _lookup(name: str, root: Path, explicit_dir: bool = True) -> Path:
    """A name's path in ``root``: the registry first, then the known layout; HubError if absent."""
    rec = load_registry(root).get(name)
    if rec is not None:
        path = root / rec["path"]
        if path.exists():
            return path
        raise HubError(f"{name} is registered at {path} but it is gone; run `viqctl download {name}` again "
                       f"(models dir {root})")
    entry = KNOWN_MODELS.get(name)
    if entry is None:
        raise HubError(f"{name!r} is neither an existing path nor a model name known or registered in {root}; "
                       "see `viqctl download --list`")
    target = _find_target(entry, root / entry.folder)
    if target is None or _missing_in(entry, target):
        from viq.hf_cache import in_hub_cache

        cached = in_hub_cache(entry)  # fetched by another Hugging Face tool: use it where it is
        if cached is not None:
            return cached
        raise HubError(f"{name} is not downloaded in {root}; run `viqctl download {name}"
                       + (f" --dir {root}" if explicit_dir else "") + "`")
    return target
