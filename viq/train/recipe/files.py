"""Reading recipe files: ``extends`` parents, named stages, overrides, variables, then validation.

A stage that starts from another (``init.stage``) is checked against it here, so a mismatched
hand-over fails when the recipe is read rather than after the first stage has trained.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Optional, Union

from pydantic import ValidationError

from viq.errors import RecipeError
from viq.train.recipe.problems import problems, report
from viq.train.recipe.renamed import moved_keys
from viq.train.recipe.schema import Recipe
from viq.train.recipe.tree import MAX_TEXT_CHARS, apply_override, check_values, deep_merge, load_yaml, substitute

FILE_KEYS = ("extends", "stages")  # consumed while reading a file; not part of a resolved Recipe


def _read_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a dict, with its ``extends`` parent merged underneath."""
    path = Path(path)
    if path.resolve() in chain:
        raise RecipeError(f"{path}: 'extends' loops back to itself")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    if path.stat().st_size > 4 * MAX_TEXT_CHARS:
        raise RecipeError(f"{path}: {path.stat().st_size:,} bytes; too large for a recipe")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                          "save the recipe as UTF-8") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        data = deep_merge(_read_file(path.parent / str(parent), chain + (path.resolve(),)), data)
    return data


def _stages(raw: dict, where: str) -> dict[str, dict]:
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise RecipeError(f"{where}: stages must map stage names to override sections")
    out = {}
    for name, over in stages.items():
        if over is not None and not isinstance(over, dict):
            raise RecipeError(f"{where}: stages.{name} must be a mapping of overrides")
        out[str(name)] = over or {}
    return out


def list_stages(path: Union[str, Path]) -> list[str]:
    """Stage names of a recipe file, in file order."""
    return list(_stages(_read_file(Path(path)), str(path)))


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    """Validate an already-merged recipe dict (no stages, overrides or variables left)."""
    check_values(data, source)
    moved = moved_keys(data)
    if moved:
        raise RecipeError(report(source, moved))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(report(source, problems(exc, Recipe, top_keys=FILE_KEYS))) from None
    _check_weight_paths(recipe, source)
    return recipe


def _check_weight_paths(recipe: Recipe, source: str) -> None:
    """Fields naming weights hold something a loader can open or look up, checked now rather than
    when the run reaches them (a path the OS refuses would otherwise crash mid-run)."""
    from viq.train.weight_paths import FIELDS

    values = [(f"{s}.{k}", getattr(getattr(recipe, s), k, None)) for s, k, _ in FIELDS if getattr(recipe, s, None)]
    values += [(f"paths.{k}", v) for k, v in recipe.paths.items()]
    for key, value in values:
        if not isinstance(value, str):
            continue
        bad = next((ch for ch in value if ord(ch) < 32 or ord(ch) == 127), None)
        if bad is not None:
            raise RecipeError(f"{source}: {key}: contains the control character {bad!r}; give a path or a model name")
        if len(value) > 4096 or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in value.split("/")):
            raise RecipeError(f"{source}: {key}: too long for a path (components up to 255 bytes, 4096 in all)")
        if value.startswith("~"):
            try:
                Path(value).expanduser()
            except RuntimeError:
                raise RecipeError(f"{source}: {key}: {value.split('/')[0]} names no user with a home folder") from None


def load_recipe(path: Union[str, Path], stage: Optional[str] = None,
                overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge (base + stage + ``key.path=value`` overrides), substitute ``${...}`` and validate."""
    return _load(Path(path), stage, list(overrides), ())


def _load(path: Path, stage: Optional[str], overrides: list[str], chain: tuple[str, ...],
          skip_null: bool = False) -> Recipe:
    raw = _read_file(path)
    stages = _stages(raw, str(path))
    data = {k: v for k, v in raw.items() if k != "stages"}
    source = str(path)
    if stage is not None:
        stage = str(stage)
        if stage not in stages:
            close = difflib.get_close_matches(stage, list(stages), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            names = ", ".join(stages) or "none (base only)"
            raise RecipeError(f"{path}: no stage {stage!r}{hint}; stages: {names}")
        data = deep_merge(data, stages[stage])
        source = f"{path} [stage {stage}]"
    for text in overrides:
        apply_override(data, text, skip_null)
    if stage is not None and isinstance(data.get("run", {}), dict):
        data.setdefault("run", {})["stage"] = stage
    recipe = validate_recipe(substitute(data), source)
    if recipe.init.stage and stages:  # a resolved printout has no stages left to compare with
        _check_handover(path, recipe, stages, overrides, chain + (stage or "",), source)
    return recipe


def _check_handover(path: Path, recipe: Recipe, stages: dict, overrides: list[str], chain: tuple[str, ...],
                    source: str) -> None:
    """A stage that starts from another must share its ViT; a changed quantizer needs reinit_mismatched.

    The source stage is resolved with the same overrides (minus the hand-over keys themselves),
    since a user passes the same ``key=value`` to every stage of one progression.
    """
    src = recipe.init.stage
    if src not in stages:
        raise RecipeError(f"{source}: init.stage {src!r} is not a stage of this recipe "
                          f"({', '.join(stages) or 'none'})")
    if src in chain:
        raise RecipeError(f"{source}: init.stage loops ({' -> '.join(chain + (src,))})")
    shared = [o for o in overrides if not o.strip().startswith("init.")]
    before = _load(path, src, shared, chain, skip_null=True)  # e.g. quantizer.* overrides: stage 1 has none
    if before.model.vit != recipe.model.vit:
        raise RecipeError(f"{source}: starts from stage {src!r} but its ViT architecture (model.vit) differs")
    old, new = _quantizer_shape(before), _quantizer_shape(recipe)
    if old is not None and new is not None and old != new and not recipe.init.reinit_mismatched:
        raise RecipeError(
            f"{source}: starts from stage {src!r} whose head differs ({_fmt_shape(old)} -> {_fmt_shape(new)}); "
            "tensors such as the quantizer's project_in/project_out change shape. Set "
            "init.reinit_mismatched: true to re-initialise them on purpose (they are reported at load)")


def _quantizer_shape(r: Recipe):
    q, h = r.quantizer, r.model.head
    if q is None:
        return None
    width = len(h.levels) if q.type == "fsq" else q.bottleneck_dim
    return (q.type, width, q.codebook_size, h.fsq_blocks, h.slots, h.pre_blocks, h.residual_mlps)


def _fmt_shape(s) -> str:
    return f"{s[0]} width {s[1]}, {s[3]} RoPE blocks"
