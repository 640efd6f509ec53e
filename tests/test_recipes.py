"""Recipe schema: every shipped YAML and stage validates; errors name keys; overrides and stages merge."""

import math
from pathlib import Path

import pytest
import yaml

from viq.config import FSQ_PRESETS, ViQConfig, preset_config
from viq.errors import RecipeError
from viq.train.recipe import Recipe, list_stages, load_recipe, parse_override

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = [(p.name, s) for p in sorted(RECIPES.glob("*.yaml")) for s in [None, *list_stages(p)]]


def test_recipes_exist():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"fsq2k.yaml", "fsq4k.yaml", "fsq8k.yaml", "fsq16k.yaml", "fsq64k.yaml", "viq-stages.yaml",
            "decoder.yaml", "mllm-offline.yaml", "tiny.yaml"} <= names
    assert set(list_stages(RECIPES / "viq-stages.yaml")) == {"1", "2-1", "2-2"}
    assert set(list_stages(RECIPES / "tiny.yaml")) == {"1", "2-1", "2-2"}


@pytest.mark.parametrize("name,stage", ALL, ids=[f"{n}:{s or 'base'}" for n, s in ALL])
def test_every_recipe_and_stage_validates(name, stage, tmp_path):
    recipe = load_recipe(RECIPES / name, stage)
    assert recipe.run.stage == stage
    # one architecture schema: model: is the ViQConfig that config.json stores, named after the run
    assert type(recipe.model) is ViQConfig and Recipe.model_fields["model"].annotation is ViQConfig
    assert ViQConfig.model_validate_json(recipe.model.model_dump_json()) == recipe.model
    assert recipe.model.name == recipe.run.name
    # --print-config output loads back to the same recipe
    (tmp_path / "resolved.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "resolved.yaml") == recipe


@pytest.mark.parametrize("size", ["2k", "4k", "8k", "16k", "64k"])
def test_released_recipes_per_size(size):
    r = load_recipe(RECIPES / f"fsq{size}.yaml")
    assert r.model.head.levels == FSQ_PRESETS[size] and r.quantizer.type == "fsq"
    assert r.model.head.codebook_size == math.prod(FSQ_PRESETS[size])
    assert r.model.vit.width == 1536 and r.model.vit.depth == 40
    assert r.model.model_dump(exclude={"name"}) == preset_config("giant", size).model_dump(exclude={"name"})
    # the values of the reference's example.sh
    assert (r.optim.lr, r.optim.weight_decay, r.optim.grad_accum) == (1e-4, 1e-4, 2)
    assert (r.optim.schedule.warmup_ratio, r.optim.schedule.min_lr_ratio) == (0.05, 0.1)
    assert r.runtime.precision == "bf16"
    assert (r.llm.lora.r, r.llm.lora.alpha, r.llm.lora.dora) == (64, 16, True)
    assert r.losses.cls_distill.weight == 10 and r.losses.rec_latent_mse == 1.0
    # the released stage-1 ViT, by its `viqctl download` name (resolved at train time: test_weight_paths.py)
    assert r.init.ckpt == "viq-anyres-vit-g" and r.teacher.ckpt == "siglip2-g"


def test_stages_follow_the_paper():
    s1, s21, s22 = (load_recipe(RECIPES / "viq-stages.yaml", s) for s in ("1", "2-1", "2-2"))
    assert s1.quantizer is None and not s1.decoder.enabled and s1.init.format == "siglip2_openclip"
    assert s1.freeze.vit_mlp_and_norm and not s1.freeze.vit
    q = s21.quantizer
    assert (q.type, q.limit, q.bottleneck_dim, s21.model.head.fsq_blocks) == ("passthrough", "l_infinite", 32, 0)
    assert s22.quantizer.type == "fsq" and s22.init.reinit_mismatched and s22.freeze.vit
    assert s22.model.head.fsq_blocks == 3 and s1.model.vit == s21.model.vit == s22.model.vit
    assert s22.init_path == Path("runs/viq-stages/2-1") and s22.out_dir == Path("runs/viq-stages/2-2")


def test_the_design_card_stage_command_runs_the_papers_stages():
    """`viqctl train --recipe fsq16k.yaml [--stage 2-1]`: without --stage the released single-stage
    recipe, with one the paper's stages (the same as viq-stages.yaml's, in runs/fsq16k/<stage>);
    the other sizes inherit them with their own levels."""
    assert list_stages(RECIPES / "fsq16k.yaml") == list_stages(RECIPES / "viq-stages.yaml") == ["1", "2-1", "2-2"]
    assert load_recipe(RECIPES / "fsq16k.yaml").quantizer.type == "fsq"  # the base run is unchanged
    for stage in ("1", "2-1", "2-2"):
        ours = load_recipe(RECIPES / "fsq16k.yaml", stage).model_dump()
        paper = load_recipe(RECIPES / "viq-stages.yaml", stage).model_dump()
        assert ours["run"] == {**paper["run"], "name": "fsq16k", "output_dir": "runs/fsq16k"}
        assert (ours["model"]["name"], paper["model"]["name"]) == ("fsq16k", "viq-stages")  # from run.name
        paper["model"]["name"] = "fsq16k"
        assert {k: v for k, v in ours.items() if k != "run"} == {k: v for k, v in paper.items() if k != "run"}
    s22 = load_recipe(RECIPES / "fsq16k.yaml", "2-2")
    assert s22.init_path == Path("runs/fsq16k/2-1") and s22.out_dir == Path("runs/fsq16k/2-2")
    small = load_recipe(RECIPES / "fsq2k.yaml", "2-2")
    assert small.model.head.levels == [8, 8, 4, 3, 3] and small.init_path == Path("runs/fsq2k/2-1")


def test_tiny_recipe_is_tiny():
    r = load_recipe(RECIPES / "tiny.yaml")
    cfg = r.model
    assert cfg.vit.width == 64 and r.llm.tiny is not None and r.runtime.precision == "fp32"
    kw = r.llm.tiny.qwen2_kwargs(vocab_size=50, max_length=r.llm.max_length)
    assert kw["vocab_size"] == 50 and kw["hidden_size"] == 64
    wide = load_recipe(RECIPES / "tiny.yaml", overrides=["model.vit.width=96"]).model
    assert wide.vit.width == 96 and wide.vit.mlp_hidden == 4 * 96  # the tiny preset's derived widths follow
    assert load_recipe(RECIPES / "tiny.yaml", overrides=["model.vit.mlp_hidden=100"]).model.vit.mlp_hidden == 100


def test_model_arch_names_a_preset_the_other_keys_override(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL + "model: {arch: so400m, head: {levels: 2k}}\n"))
    assert r.model.vit.width == 1152 and r.model.head.levels == FSQ_PRESETS["2k"] and r.model.name == "viq"
    with pytest.raises(RecipeError, match="unknown preset 'giantt'; choose one of giant, so400m, tiny"):
        load_recipe(_write(tmp_path, MINIMAL + "model: {arch: giantt}\n"))
    named = load_recipe(_write(tmp_path, MINIMAL + "run: {name: mine}\nmodel: {arch: tiny, name: other}\n"))
    assert named.model.name == "other"


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


MINIMAL = """
paths: {root: /data}
data: {path: "${root}/train.jsonl"}
llm: {name_or_path: "${root}/qwen"}
optim: {max_steps: 10}
"""


@pytest.mark.parametrize("text,key,nearest", [
    ("optim: {lrr: 1.0e-4, max_steps: 1}", "optim.lrr", "optim.lr"),
    ("optimm: {lr: 1}", "optimm", "optim"),
    ("model: {head: {levles: [8, 8]}}", "model.head.levles", "model.head.levels"),
    ("model: {vit: {widht: 32}}", "model.vit.widht", "model.vit.width"),
    ("init: {ckpts: x}", "init.ckpts", "init.ckpt"),
    ("freeze: {vits: true}", "freeze.vits", "freeze.vit"),
    ("stagse: {}", "stagse", "stages"),
])
def test_typo_names_key_and_nearest(tmp_path, text, key, nearest):
    base = MINIMAL.replace("optim: {max_steps: 10}\n", "") if text.startswith("optim:") else MINIMAL  # no key twice
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, base + text))
    msg = str(e.value)
    assert f"{key}: unknown key" in msg and repr(nearest) in msg


def test_typo_in_override_and_several_problems_listed(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, MINIMAL), overrides=["runtime.precison=bf16", "optim.lr=-1"])
    msg = str(e.value)
    assert "runtime.precison" in msg and "'runtime.precision'" in msg and "optim.lr:" in msg


def test_dotted_overrides(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL), overrides=[
        "optim.lr=3e-4", "model.head.levels=[8,8,8,5,5]", "runtime.precision=fp16",
        "optim.betas=[0.5, 0.9]", "paths.root=/other", "run.name=x"])
    assert r.optim.lr == pytest.approx(3e-4) and isinstance(r.optim.lr, float)
    assert r.model.head.levels == [8, 8, 8, 5, 5]
    assert r.runtime.precision == "fp16" and r.optim.betas == (0.5, 0.9)
    assert r.data.path == "/other/train.jsonl"  # variables resolve after overrides
    assert load_recipe(_write(tmp_path, MINIMAL), overrides=["model.head.levels=2k"]).model.head.levels \
        == FSQ_PRESETS["2k"]
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(_write(tmp_path, MINIMAL), overrides=["optim.lr"])
    with pytest.raises(RecipeError, match="optim.max_steps is a value"):
        load_recipe(_write(tmp_path, MINIMAL), overrides=["optim.max_steps.x=1"])
    with pytest.raises(RecipeError, match="quantizer is null here"):  # stage 1 has no head: no silent revival
        load_recipe(RECIPES / "tiny.yaml", "1", ["quantizer.limit=l2"])
    # ... while the same override on a later stage still works (its hand-over check resolves stage 1)
    assert load_recipe(RECIPES / "tiny.yaml", "2-1", ["quantizer.limit=l2"]).quantizer.limit == "l2"


def test_floats_without_dot_in_yaml(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL + "runtime: {save_every: 5}\n"), overrides=["optim.eps=1e-6"])
    assert r.optim.eps == 1e-6


def test_unknown_stage_lists_stages():
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES / "tiny.yaml", stage="2_1")
    assert "'2-1'" in str(e.value) and "1, 2-1, 2-2" in str(e.value)


def test_variables(tmp_path):
    text = MINIMAL.replace("paths: {root: /data}", "paths: {root: /data, models: '${root}/m'}") + \
        "init: {ckpt: '${models}/vit.pth'}\n"
    assert load_recipe(_write(tmp_path, text)).init.ckpt == "/data/m/vit.pth"
    typo = r"init.ckpt: unknown variable \$\{modles\}; did you mean \$\{models\}"
    with pytest.raises(RecipeError, match=typo):
        load_recipe(_write(tmp_path, text.replace("${models}/vit", "${modles}/vit")))
    with pytest.raises(RecipeError, match="loop"):
        load_recipe(_write(tmp_path, MINIMAL.replace("{root: /data}", "{root: '${a}', a: '${root}'}")))


@pytest.mark.parametrize("override,message", [
    ("model.head.levels=null", "model.head.levels: Input should be a valid list"),
    ("model.head.levels=[8,1]", "FSQ levels must be integers >= 2"),
    ("quantizer.type=passthrough", "passthrough needs bottleneck_dim"),
    ("quantizer={type: passthrough, bottleneck_dim: 32}", "passthrough needs a limit"),
    ("quantizer={type: simvq, bottleneck_dim: 32}", "simvq needs codebook_size"),
    ("quantizer.limit=l2", "limit does not apply to fsq"),
    ("init={ckpt: a, stage: b}", "set init.ckpt or init.stage, not both"),
    ("model.pixel_decoder={}", "model.pixel_decoder is only trained by run.task decoder"),
    ("teacher.enabled=false", "losses.cls_distill needs teacher.enabled"),
    ("losses.rec_latent_mse=1.0", "rec_latent_mse > 0 needs decoder.enabled"),
    ("quantizer=null", "cls_distill.source: vit"),
    ("llm=null", "lm_ce > 0 needs an llm"),
    ("optim.epochs=1", "exactly one of optim.max_steps or optim.epochs"),
    ("data.default_resize.patch=16", "multiple of 32"),
    ("llm.trainable=true", "exclude each other"),
    ("data.path=x.csv", ".jsonl"),
    ("decoder.mse.enabled=true", "need target: pixel"),
    ("runtime.eval_every=10", "data.val_path"),
])
def test_cross_field_rules(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(_write(tmp_path, MINIMAL), overrides=[override])


@pytest.mark.parametrize("recipe,stage,override", [
    ("mllm-offline.yaml", "tiny", "data.num_workers=2"),
    ("mllm-offline.yaml", "tiny", "data.max_tokens_per_batch=512"),
    ("mllm-offline.yaml", "tiny", "data.default_resize.base=448"),
    ("tiny-decoder.yaml", None, "data.max_tokens_per_batch=512"),
])
def test_keys_a_task_does_not_read_are_refused(recipe, stage, override):
    load_recipe(RECIPES / recipe, stage)  # the shipped recipe itself is fine
    key = override.split("=")[0].split(".")[:2]
    with pytest.raises(RecipeError, match=f"{'.'.join(key)} is not read by run.task"):
        load_recipe(RECIPES / recipe, stage, [override])


def test_handover_needs_reinit(tmp_path):
    with pytest.raises(RecipeError, match="reinit_mismatched"):
        load_recipe(RECIPES / "tiny.yaml", "2-2", ["init.reinit_mismatched=false"])
    deeper = MINIMAL + "stages:\n  a: {}\n  b: {init: {stage: a}, model: {vit: {depth: 3}}}\n"
    with pytest.raises(RecipeError, match="ViT architecture"):
        load_recipe(_write(tmp_path, deeper), "b")
    text = MINIMAL + "stages:\n  a: {init: {stage: b}}\n"
    with pytest.raises(RecipeError, match="not a stage"):
        load_recipe(_write(tmp_path, text), "a")


def test_extends_merges_parent(tmp_path):
    _write(tmp_path, MINIMAL + "run: {name: parent, seed: 3}\n", "parent.yaml")
    r = load_recipe(_write(tmp_path, "extends: parent.yaml\nrun: {name: child}\n"))
    assert (r.run.name, r.run.seed, r.data.path) == ("child", 3, "/data/train.jsonl")


def test_schedule():
    s = load_recipe(RECIPES / "fsq16k.yaml").optim.schedule
    assert s.warmup_for(100) == 5
    assert s.lr_factor(0, 100) == 0 and s.lr_factor(5, 100) == pytest.approx(1.0)
    assert s.lr_factor(100, 100) == pytest.approx(0.1) and s.lr_factor(52, 100) < 1


def test_to_yaml_is_plain_yaml():
    data = yaml.safe_load(load_recipe(RECIPES / "fsq16k.yaml").to_yaml())
    assert data["optim"]["lr"] == 1e-4 and "stages" not in data
    assert isinstance(Recipe.model_validate(data), Recipe)


def test_a_recipe_in_the_old_layout_is_told_where_each_key_went(tmp_path):
    old = MINIMAL + ("model: {arch: tiny, init_ckpt: x, trainable: false}\n"
                     "head: {pre_blocks: 1, layernorm_trick: true, quantizer: {levels: [8, 8], pre_attn_blocks: 0}}\n"
                     "decoder: {pixel: {}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, old))
    msg = str(e.value)
    for line in ("model.init_ckpt moved to init.ckpt", "model.trainable moved to freeze.vit",
                 "head.quantizer.levels moved to model.head.levels", "head.pre_blocks moved to model.head.pre_blocks",
                 "head.quantizer.pre_attn_blocks moved to model.head.fsq_blocks",
                 "head.layernorm_trick is gone (always on)", "decoder.pixel moved to model.pixel_decoder"):
        assert line in msg, line
    with pytest.raises(RecipeError, match="stage 1 \\(no head\\) is now quantizer: null"):
        load_recipe(_write(tmp_path, MINIMAL + "head: null\n"))
