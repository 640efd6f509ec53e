"""Recipe weights fields may name `viqctl download` entries; they resolve to what the download wrote."""

from pathlib import Path

import pytest

from viq.errors import ViQError
from viq.train import load_recipe
from viq.train.weight_paths import resolve_recipe_weights, resolve_weight

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def fake_download(models: Path) -> None:
    """The files `viqctl download siglip2-g qwen-image-vae viq-anyres-vit-g qwen2.5-0.5b` leave behind."""
    sig = models / "siglip2_g_384_16"
    sig.mkdir(parents=True)
    (sig / "open_clip_config.json").write_text("{}")
    (sig / "open_clip_model.safetensors").write_bytes(b"x")
    vae = models / "Qwen-Image" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    vit = models / "ViQ_weights" / "anyres_vit" / "giant1b"
    vit.mkdir(parents=True)
    (vit / "siglip2_g_anyres_s4.pth").write_bytes(b"x")
    llm = models / "Qwen2.5-0.5B"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text("{}")
    (llm / "model.safetensors").write_bytes(b"x")


def test_shipped_recipe_names_resolve_to_downloaded_files(tmp_path):
    models = tmp_path / "models"
    fake_download(models)
    recipe = load_recipe(RECIPES / "fsq16k.yaml", overrides=[f"paths.models={models}"])
    assert recipe.teacher.ckpt == "siglip2-g" and recipe.init.ckpt == "viq-anyres-vit-g"
    got = resolve_recipe_weights(recipe)
    assert got.teacher.ckpt == str(models / "siglip2_g_384_16" / "open_clip_model.safetensors")
    assert got.init.ckpt == str(models / "ViQ_weights/anyres_vit/giant1b/siglip2_g_anyres_s4.pth")
    assert got.decoder.vae_path == str(models / "Qwen-Image" / "vae")
    assert got.llm.name_or_path == str(models / "Qwen2.5-0.5B")
    assert recipe.teacher.ckpt == "siglip2-g"  # the original is left alone
    stage1 = resolve_recipe_weights(load_recipe(RECIPES / "viq-stages.yaml", "1", [f"paths.models={models}"]))
    assert stage1.init.ckpt.endswith("open_clip_model.safetensors")


def test_paths_and_stand_ins_pass_through_and_missing_downloads_say_what_to_run(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_weight(str(f), str(tmp_path)) == str(f)
    assert resolve_weight("tiny", str(tmp_path)) == "tiny"
    assert resolve_weight(None, str(tmp_path)) is None
    assert resolve_weight(str(tmp_path / "nowhere.pth"), str(tmp_path)) == str(tmp_path / "nowhere.pth")
    with pytest.raises(ViQError, match="viqctl download dinov2-base"):
        resolve_weight("dinov2-base", str(tmp_path / "empty-models"))
