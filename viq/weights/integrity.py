"""Weights that are exactly what was written, and values a model can use.

Why: a flipped bit, a half-written folder or a NaN tensor otherwise loads and runs, and the damage
shows up later as wrong codes or black images that blame the input. viq-written folders record a
sha256 per part in config.json (written last); every load checks the parts it reads. Every load,
whatever the layout, refuses tensors of the wrong kind (bool/int where floats belong) or with
NaN/inf values, naming the tensor and its file.

Folders are published whole: ``publish_folder`` writes beside the target and renames, so a reader
sees the old folder or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from viq.errors import ConfigError, IntegrityError
from viq.weights.io import sha256_file


def check_digest(folder: Path, part: str, entry: dict) -> None:
    """The part's file exists and its sha256 is the one config.json recorded."""
    name = str(entry.get("file", ""))
    path = Path(folder) / name
    want = entry.get("sha256")
    if not want:
        raise IntegrityError(f"{folder}/config.json records no sha256 for the '{part}' part; "
                             "re-export the folder with `viqctl convert`")
    if not name or Path(name).name != name or name in (".", ".."):
        raise IntegrityError(f"{folder}/config.json: the '{part}' part names {name!r}, not a file of the folder")
    if not path.is_file():  # a FIFO or a device is not a file either: never read (it could block)
        raise IntegrityError(f"{path}: the '{part}' part is missing (config.json lists it); the folder is "
                             "incomplete: convert or download it again")
    size = path.stat().st_size
    if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
        raise IntegrityError(f"{path}: the '{part}' part has {size:,} bytes, config.json recorded "
                             f"{entry['bytes']:,}: it was changed or half-written; convert or download it again")
    have = sha256_file(path)
    if have != want:
        raise IntegrityError(f"{path}: the '{part}' part was changed or half-written (sha256 {have[:12]}... "
                             f"!= {want[:12]}... recorded in config.json); convert or download it again")


def folder_problems(folder: Path, parts: dict) -> list[str]:
    """Every digest problem of a viq folder's listed parts (empty when all match)."""
    found = []
    for part, entry in parts.items():
        try:
            check_digest(folder, part, entry if isinstance(entry, dict) else {})
        except IntegrityError as exc:
            found.append(str(exc))
    return found


def check_values(state: dict[str, torch.Tensor], expected: dict[str, torch.dtype],
                 file_of: Callable[[str], str]) -> None:
    """Float tensors where the model has floats, no NaN/inf in them; raises naming the tensor."""
    for key, t in state.items():
        want = expected.get(key)
        if want is None:
            continue
        if t.is_floating_point() != want.is_floating_point or t.is_complex():
            kind = "floating-point" if want.is_floating_point else str(want).replace("torch.", "")
            raise IntegrityError(f"{file_of(key)}: tensor {key} has dtype {str(t.dtype).replace('torch.', '')}, "
                                 f"but the model needs {kind} values there; the file is corrupt or not ViQ weights")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise IntegrityError(f"{file_of(key)}: tensor {key} holds {bad} NaN/inf value(s) of {t.numel()}; "
                                 "the weights are corrupt (or a training run diverged)")


def refuse_in_place(source: Path, out: Path, also: tuple[Path, ...] = ()) -> None:
    """``convert X --out X`` (or an --out that holds or lies in what is read) would replace its own input."""
    out_r = Path(out).expanduser().resolve()
    for src in (Path(source).expanduser(), *also):
        src_r = src.resolve()
        folder = src_r if src_r.is_dir() else src_r.parent
        if out_r == folder or out_r in src_r.parents or (src_r.is_dir() and src_r in out_r.parents):
            raise ConfigError(f"--out {out} would overwrite the input {source}; write to another folder "
                              "(then move it over the old one if you want to replace it)")


def _viq_owned(name: str) -> bool:
    """Names a viq weights folder is made of (replaced as a whole on publish)."""
    return name == "config.json" or name.endswith(".safetensors") or name.startswith("converted_")


@contextmanager
def publish_folder(out: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``out``; on success it replaces ``out`` as a whole.

    An existing ``out`` must be a viq weights folder (or empty): its other files (notes, metrics)
    are carried over, its weights are not. A failure or kill before the rename leaves ``out`` as it
    was (plus a ``.<name>.tmp-*`` folder, removed on the next publish). Between the two renames
    ``out`` briefly does not exist: a reader then fails to find it, it never sees a mix.
    """
    out = Path(out).expanduser()
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder")
        entries = list(out.iterdir())
        if entries and not (out / "config.json").is_file():
            raise ConfigError(f"--out {out} is not empty and not a viq weights folder; use a new or empty folder")
    for stale in [*parent.glob(f".{out.name}.tmp-*"), *parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed publish
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            for f in out.iterdir():  # keep what is not the weights themselves
                if not _viq_owned(f.name) and not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
            old = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
