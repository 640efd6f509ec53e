"""Recipe fields that name weights: a path, or a `viqctl download` name looked up in ``paths.models``.

A recipe can say ``teacher.ckpt: siglip2-g`` instead of guessing where the download put the file;
the name resolves to exactly what ``viqctl download siglip2-g`` wrote (or a clear "not downloaded,
run viqctl download siglip2-g"). Existing paths, ``tiny`` stand-ins and unknown strings are left
as they are, so the loaders still report a missing path with its field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

#: (section, field) pairs that hold weights; ``file`` ones want a single checkpoint file.
FIELDS = (("init", "ckpt", "file"), ("teacher", "ckpt", "file"), ("decoder", "vae_path", "dir"),
          ("llm", "name_or_path", "dir"), ("llm", "tokenizer", "dir"))
TINY = "tiny"
#: inside a SigLIP2 download, the file a checkpoint field means (safetensors first: no pickle).
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def models_dir_of(recipe) -> Optional[str]:
    return recipe.paths.get("models")


def resolve_weight(value: Optional[str], models_dir: Optional[str], want: str = "dir") -> Optional[str]:
    """``value`` as a path: unchanged unless it is a model name known to ``viqctl download``."""
    if value is None or value == TINY or Path(value).expanduser().exists():
        return value
    from viq import hub

    root = hub.default_models_dir(models_dir)
    if value not in hub.KNOWN_MODELS and value not in hub.load_registry(root):
        return value  # a path that is not there: the loader names it
    path = hub.resolve_model(value, root)
    if want == "file" and path.is_dir():
        for name in _OPEN_CLIP_FILES:
            if (path / name).is_file():
                return str(path / name)
    return str(path)


def resolve_recipe_weights(recipe):
    """A copy of ``recipe`` with every weights field that names a download replaced by its path.

    Downloads that are missing are reported all at once, with the one command that fetches them.
    """
    from viq.errors import HubError

    models = models_dir_of(recipe)
    updates: dict[str, dict] = {}
    missing: list[tuple[str, str]] = []  # (field, name)

    def resolve(field: str, value, want: str):
        try:
            return resolve_weight(value, models, want)
        except HubError:
            missing.append((field, value))
            return value

    for section, key, want in FIELDS:
        sec = getattr(recipe, section)
        if sec is None or (section == "init" and recipe.init.stage):
            continue
        value = getattr(sec, key)
        resolved = resolve(f"{section}.{key}", value, want)
        if resolved != value:
            updates.setdefault(section, {})[key] = resolved
    dec = recipe.decoder
    if dec.repa is not None and isinstance(dec.repa.encoder, str):
        enc = resolve("decoder.repa.encoder", dec.repa.encoder, "dir")
        if enc != dec.repa.encoder:
            updates["decoder_repa"] = {"encoder": enc}
    if missing:
        from viq import hub

        names = list(dict.fromkeys(name for _, name in missing))
        where = f" --dir {models}" if models else ""
        raise HubError(f"this recipe needs {len(names)} download(s) not in {hub.default_models_dir(models)}: "
                       + ", ".join(f"{name} ({field})" for field, name in missing)
                       + f"; fetch them all with: viqctl download {' '.join(names)}{where}")
    if not updates:
        return recipe
    out = recipe.model_copy(deep=True)
    for section, fields in updates.items():
        target = out.decoder.repa if section == "decoder_repa" else getattr(out, section)
        for key, value in fields.items():
            setattr(target, key, value)
    return out
