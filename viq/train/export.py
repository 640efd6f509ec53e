"""A step checkpoint of a tokenizer run -> the inference weights the finished run would have written.

A checkpoint holds only trained tensors (``model.trained_state``: no frozen VAE); the run's
``recipe.yaml`` rebuilds everything else exactly as training did (same seeds, same VAE source),
so a run stopped early, or any intermediate step, converts like a finished one.
"""

from __future__ import annotations

from pathlib import Path

from viq.errors import ConfigError, KeyMismatchError, WeightsError
from viq.train import checkpoint as ckpt


def is_step_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and bool(ckpt.STEP_DIR.match(path.name)) and (path / ckpt.STATE_FILE).is_file()


def read_step_checkpoint(path: Path):
    """``step_checkpoint_state`` for a step checkpoint, None for anything else (the reader convert takes)."""
    return step_checkpoint_state(path) if is_step_checkpoint(path) else None


def convert_step(path, out_dir, **options):
    """viq.weights.convert.convert that also understands ``<run>/checkpoints/step-N``."""
    from viq.weights.convert import convert

    return convert(path, out_dir, step_reader=read_step_checkpoint, **options)


def step_checkpoint_state(path: Path):
    """(viq config, state in viq names, description) for ``<run>/checkpoints/step-N``."""
    from viq.train.recipe import load_recipe
    from viq.train.build import build_student, build_target_vae
    from viq.train.weight_paths import resolve_recipe_weights

    path = Path(path)
    run_dir = path.parent.parent
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise WeightsError(f"{path}: its run folder {run_dir} has no recipe.yaml to rebuild the model from")
    recipe = resolve_recipe_weights(load_recipe(recipe_file))
    if recipe.run.task != "tokenizer":
        raise ConfigError(f"{path}: a {recipe.run.task} run; only tokenizer runs hold ViQ weights")
    c = ckpt.read_checkpoint(path)
    cfg = recipe.model
    vae = None
    if recipe.decoder.enabled:
        vae, cfg = build_target_vae(recipe, cfg, recipe.run.seed + 3)  # the seed training used
    student = build_student(recipe, cfg)
    if vae is not None:
        full = vae.state_dict()
        student.drawer.vae.load_state_dict({k: full[k] for k in student.drawer.vae.state_dict()})
    tensors = {k.removeprefix("student."): v for k, v in c.model.items() if k.startswith("student.")}
    own = student.state_dict()
    missing = sorted(k for k in own if k not in tensors and not k.startswith("drawer.vae.")
                     and k not in student.idle_keys)
    unexpected = sorted(k for k in tensors if k not in own)
    if missing or unexpected:
        raise KeyMismatchError(str(path / "model.safetensors"), missing, unexpected)
    student.load_state_dict({**own, **tensors})
    step = c.state.get("step", path.name)
    return cfg, student.viq_state(), f"{recipe.run.name} stage {recipe.run.stage} step {step}"
