"""Every stage of the tiny recipe trains a few steps on CPU; 1 -> 2-1 -> 2-2 hands weights over."""

import math
from pathlib import Path

import pytest
import torch

from viq.data import make_shapes_dataset
from viq.errors import WeightsError
from viq.train.recipe import load_recipe
from viq.train.run import apply_init, train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
FAST = ["optim.max_steps=2", "data.micro_batch_size=4", "runtime.log_every=1", "runtime.save_every=2",
        "data.num_workers=0"]


def tiny(root: Path, stage=None, *extra):
    return load_recipe(TINY, stage, [f"paths.data={root / 'shapes'}", f"run.output_dir={root / 'runs'}", *FAST,
                                     *extra])


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Stages 1, 2-1 and 2-2 in order (each starts from the previous one), and the single stage."""
    root = tmp_path_factory.mktemp("stages")
    make_shapes_dataset(root / "shapes", n_train=16, n_val=4, seed=3)
    events = []
    results = {s: train(tiny(root, s), eval_limit=4, eval_at_start=(s == "2-2"), progress=events.append)
               for s in ("1", "2-1", "2-2")}
    results["base"] = train(tiny(root), eval_limit=4, eval_at_start=False)
    return root, results, events


@pytest.mark.parametrize("stage", ["1", "2-1", "2-2", "base"])
def test_stage_trains_with_finite_losses(staged, stage):
    _, results, _ = staged
    r = results[stage]
    assert r.steps == 2 and len(r.history) == 2
    for rec in r.history:
        assert all(math.isfinite(v) for v in rec.values()), rec
    terms = set(r.history[0])
    assert "lm_ce" in terms and "cls_distill" in terms
    assert ("rec_latent_mse" in terms) == (stage != "1")
    assert r.state_path.is_file() and r.metrics_path.is_file() and r.checkpoint.name == "step-00000002"
    assert (r.viq_dir is not None) == (stage in ("2-2", "base"))  # only FSQ students have codes to export
    final = r.metrics["eval"]["final"]
    assert 0 <= final["caption_token_accuracy"] <= 1 and final["samples"] == 4
    assert 0 <= final["caption_token_accuracy_image_blind"] <= 1  # the bar the image has to lift it above
    if stage != "1":
        assert math.isfinite(final["latent_mse"])


def test_handover_reinitialises_and_reports(staged):
    root, results, _ = staged
    rep = results["2-2"].init
    assert rep is not None and rep.format == "training" and rep.source.endswith("2-1")
    changed = " ".join(rep.reinitialised)
    assert "student.head.project_in.weight (8, 64) -> (5, 64)" in changed  # 8-d bottleneck -> 5 FSQ levels
    assert "student.head.project_out.weight" in changed
    assert any(k.startswith("student.head.fsq_blocks.") for k in rep.fresh)  # 2-1 had no RoPE blocks
    assert not any(k.startswith(("student.vit.", "mllm.")) for k in rep.fresh)  # ViT and LLM carried over
    assert (root / "runs" / "2-2" / "init-report.json").is_file()
    # 2-1 started from stage 1: the ViT and LLM came over, the whole head is new
    rep21 = results["2-1"].init
    assert rep21.loaded > 0 and not rep21.reinitialised
    assert any(k.startswith("student.head.") for k in rep21.fresh)


def test_stage_2_2_froze_the_vit(staged):
    from safetensors.torch import load_file

    root, results, _ = staged
    before = load_file(root / "runs" / "2-1" / "model.safetensors")
    after = load_file(root / "runs" / "2-2" / "model.safetensors")
    blocks = [k for k in after if k.startswith("student.vit.blocks.")]
    assert blocks and all(torch.equal(before[k], after[k]) for k in blocks)
    heads = [k for k in after if k.startswith("student.head.slot_mlp.")]
    assert any(not torch.equal(before[k], after[k]) for k in heads)


def test_mismatched_shapes_need_reinit_on_purpose(staged):
    from safetensors.torch import load_file

    root, results, _ = staged
    from viq.train.model import LossPlan, TrainModel
    from viq.train.run import build_student

    recipe = tiny(root, "2-2")
    model = TrainModel(build_student(recipe, recipe.model), None, LossPlan({}, None, False, False, True))
    tensors = {k: v for k, v in load_file(root / "runs" / "2-1" / "model.safetensors").items()
               if k.startswith("student.")}
    with pytest.raises(WeightsError, match="reinit_mismatched"):
        apply_init(model, tensors, False, "2-1", "training", [])


def test_exported_tokenizer_encodes(staged):
    from viq.tokenizer import load_tokenizer

    _, results, _ = staged
    from PIL import Image

    tok = load_tokenizer(results["2-2"].viq_dir, device="cpu")
    img = Image.fromarray(torch.randint(0, 255, (64, 96, 3), dtype=torch.uint8).numpy())
    codes = tok.encode([img])
    assert codes[0].shape == (4, 6, 4) and int(codes[0].max()) < tok.codebook_size
    assert tok.reconstruct(codes)[0].shape == (64, 96, 3)  # the drawer decodes with the training VAE


def test_progress_events(staged):
    _, _, events = staged
    kinds = [e.kind for e in events]
    assert kinds.count("start") == 3 and kinds.count("end") == 3 and kinds.count("step") == 6
    step = next(e for e in events if e.kind == "step")
    assert step.total == 2 and len(step.sample_indices) == 4 and "loss" in step.metrics
    assert any(e.kind == "eval" and e.metrics["label"] == "initial" for e in events)


def test_exported_config_is_the_recipes_model(staged):
    """One architecture schema: config.json of the exported model holds exactly the recipe's model: section."""
    import json

    root, results, _ = staged
    for stage in ("2-2", "base"):
        stored = json.loads((results[stage].viq_dir / "config.json").read_text())["model"]
        recipe = tiny(root, None if stage == "base" else stage)
        assert stored == recipe.model.model_dump(mode="json")
        assert stored["head"]["levels"] == [8, 8, 4, 4, 4] and stored["head"]["pre_blocks"] == 1
