"""The recipes shipped inside the viq package: find one by name, list them, copy one to edit.

``recipes/`` at the top of the repository is where they are written; the package reaches them as
``viq/recipes`` (a link in the source tree, real files in a built wheel), so a bare name such as
``fsq16k.yaml`` works from any directory and from a non-editable install. A path that exists
always wins over a shipped name.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import yaml

from viq.errors import RecipeError

SUFFIX = ".yaml"


def shipped_dir() -> Path:
    """The folder holding the shipped recipes (inside the installed ``viq`` package)."""
    return Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class RecipeEntry:
    name: str  # file name, e.g. "fsq16k.yaml"
    path: Path
    summary: str  # first sentence of the file's leading comment
    stages: list[str] = field(default_factory=list)
    extends: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "summary": self.summary, "stages": self.stages,
                "extends": self.extends}


def shipped_names() -> list[str]:
    folder = shipped_dir()
    return sorted(p.name for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def _summary(text: str) -> str:
    """The first sentence of the leading comment block, without its parenthesised asides."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
        if lines[-1].endswith((".", ":")):
            break
    joined = " ".join(x for x in lines if x)
    m = re.search(r"\.(\s|$)", joined)
    sentence = joined[:m.start() + 1] if m else joined
    sentence = re.sub(r"\s*\([^()]*\)", "", sentence).strip()
    return sentence[:-1] + "." if sentence.endswith(":") else sentence


def _read(path: Path) -> tuple[str, dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    return text, data if isinstance(data, dict) else {}


def list_recipes() -> list[RecipeEntry]:
    """Every shipped recipe with a one-line summary, its stages and the recipe it extends."""
    from viq.train.recipe.files import list_stages

    out = []
    for name in shipped_names():
        path = shipped_dir() / name
        text, data = _read(path)
        out.append(RecipeEntry(name, path, _summary(text), list_stages(path), data.get("extends")))  # inherited too
    return out


def _shipped(name: str) -> Path | None:
    for candidate in (name, name + SUFFIX):
        path = shipped_dir() / candidate
        if candidate.endswith(SUFFIX) and path.is_file():
            return path
    return None


def find_recipe(ref: Union[str, Path]) -> Path:
    """A recipe file from a path or a shipped name (``fsq16k``, ``fsq16k.yaml``, ``recipes/fsq16k.yaml``).

    An existing path wins; otherwise a bare name, or ``recipes/<name>`` typed outside the
    repository, is looked up among the shipped recipes. RecipeError names the choices.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"--recipe {ref}: is a directory; give a YAML file or a shipped name "
                          "(`viqctl recipes` lists them)")
    bare = len(path.parts) == 1 or (not path.is_absolute() and path.parent == Path("recipes"))
    if bare:
        found = _shipped(path.name)
        if found is not None:
            return found
    names = shipped_names()
    close = difflib.get_close_matches(path.name, names + [n[:-len(SUFFIX)] for n in names], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = "no such file, and not a shipped recipe" if bare else "no such file"
    raise RecipeError(f"recipe not found: {ref}: {where}{hint}; shipped: {', '.join(names) or 'none'} "
                      "(`viqctl recipes` lists them, `viqctl recipes cp NAME` copies one to edit)")


def copy_recipe(name: str, dest: Union[str, Path, None] = None, overwrite: bool = False) -> list[Path]:
    """Copy a shipped recipe (and the shipped recipes it ``extends``) to ``dest`` to edit.

    ``dest``: a folder (the file keeps its name) or a ``.yaml`` file name; default the current
    folder. Nothing is overwritten unless ``overwrite``. Returns the files written, the named one first.
    """
    src = _shipped(Path(str(name)).name) if len(Path(str(name)).parts) == 1 else None
    if src is None:
        names = shipped_names()
        close = difflib.get_close_matches(str(name), names + [n[:-len(SUFFIX)] for n in names], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RecipeError(f"{name}: not a shipped recipe{hint}; shipped: {', '.join(names) or 'none'}")
    dest = Path(dest).expanduser() if dest is not None else Path(".")
    if dest.suffix in (SUFFIX, ".yml") and not dest.is_dir():
        folder, target = dest.parent, dest
    else:
        folder, target = dest, dest / src.name
    plan = [(src, target)]
    _, data = _read(src)
    seen = {src.name}
    while isinstance(data.get("extends"), str):  # a copied child must still find its parent beside it
        parent = shipped_dir() / data["extends"]
        if parent.name in seen or not parent.is_file() or Path(data["extends"]).name != data["extends"]:
            break
        seen.add(parent.name)
        if not (folder / parent.name).exists() or overwrite:
            plan.append((parent, folder / parent.name))
        _, data = _read(parent)
    if target.exists() and not overwrite:
        raise RecipeError(f"{target} exists; pass --force to overwrite it, or give another destination")
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for a, b in plan:
        tmp = b.with_name(f".{b.name}.tmp-{os.getpid()}")  # whole file or nothing under the final name
        shutil.copyfile(a, tmp)
        os.replace(tmp, b)
        written.append(b)
    return written
