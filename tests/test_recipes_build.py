"""Every shipped full-size recipe and stage builds its model on the meta device (no memory, no downloads)."""

from pathlib import Path

import pytest
import torch
import yaml

from viq.train import list_stages, load_recipe
from viq.train.run import build_student

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def own_stages(path: Path) -> list:
    """The stages a file defines itself: one that only inherits its parent's (fsq2k.yaml from fsq16k.yaml)
    builds the same models with other levels, already covered by its base run."""
    return list_stages(path) if "stages" in yaml.safe_load(path.read_text()) else []


CASES = [(p.name, s) for p in sorted(RECIPES.glob("*.yaml")) if not p.name.startswith("tiny")
         for s in [None] + own_stages(p)
         if load_recipe(p, stage=s).run.task == "tokenizer"]  # decoder / MLLM tasks train no student


@pytest.mark.parametrize("name,stage", CASES)
def test_full_recipe_builds_on_meta(name, stage):
    recipe = load_recipe(RECIPES / name, stage=stage)
    cfg = recipe.model
    with torch.device("meta"):
        student = build_student(recipe, cfg)
    params = sum(p.numel() for p in student.parameters())
    assert all(p.is_meta for p in student.parameters())
    if recipe.model.vit.width == 1536:  # giant
        assert params > 1_000_000_000  # the released ViT-g/16 + head


ZERO = [(p.name, s) for p in sorted(RECIPES.glob("*.yaml")) for s in [None] + own_stages(p)
        if load_recipe(p, stage=s).runtime.deepspeed_zero]


@pytest.mark.parametrize("name,stage", ZERO)
def test_deepspeed_settings_need_no_dataloader(name, stage):
    """accelerate refuses to prepare DeepSpeed without a DataLoader unless the micro-batch size is an integer."""
    from viq.train.run import deepspeed_plugin

    recipe = load_recipe(RECIPES / name, stage=stage)
    cfg = deepspeed_plugin(recipe).deepspeed_config
    assert cfg["train_micro_batch_size_per_gpu"] == recipe.data.micro_batch_size
    assert cfg["zero_optimization"]["stage"] == recipe.runtime.deepspeed_zero
    assert cfg["gradient_accumulation_steps"] == recipe.optim.grad_accum


LLM_CASES = [(p.name, s) for p in sorted(RECIPES.glob("*.yaml")) if not p.name.startswith("tiny")
             for s in [None] + own_stages(p)
             if (r := load_recipe(p, stage=s)).llm is not None and r.llm.tiny is None]


@pytest.mark.parametrize("name,stage", LLM_CASES)
def test_full_recipe_llm_and_projector_build_on_meta(name, stage):
    """The recipe's Qwen2.5 (its published 0.5B config), its LoRA/DoRA and projector, on meta."""
    from transformers import Qwen2ForCausalLM

    from viq.bench import qwen2_config
    from viq.mllm.model import Projector, apply_lora

    recipe = load_recipe(RECIPES / name, stage=stage)
    assert recipe.llm.name_or_path == "qwen2.5-0.5b"
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(qwen2_config("0.5b"))
        llm.requires_grad_(bool(recipe.llm.trainable))
        if recipe.llm.lora.enabled:
            llm = apply_lora(llm, recipe.llm.lora)
        width = recipe.model.vit.width  # ViT tokens, or the embedder's features (the same width)
        proj = Projector(width, llm.get_input_embeddings().embedding_dim, recipe.llm.projector.type,
                         recipe.llm.projector.pool)
    total = sum(p.numel() for p in llm.parameters())
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert 0.49e9 < total - sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n) < 0.51e9
    if recipe.llm.lora.enabled:
        assert trainable and all("lora_" in n for n in trainable)
        assert any("lora_magnitude" in n for n in trainable) == recipe.llm.lora.dora
    else:
        assert len(trainable) == len(list(llm.parameters())) or not recipe.llm.trainable
    assert sum(p.numel() for p in proj.parameters()) > 0
