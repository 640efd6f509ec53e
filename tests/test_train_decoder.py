"""The decoder stage (run.task: decoder): a pixel decoder on a frozen tiny random tokenizer."""

import math
from pathlib import Path

import pytest
import torch

from viq.data import make_shapes_dataset
from viq.demo import random_model_dir
from viq.tokenizer import load_tokenizer
from viq.train.recipe import load_recipe
from viq.train.run import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-decoder.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder-stage")
    random_model_dir(root / "tok", load_recipe(RECIPE).model, seed=0)  # the tokenizer the recipe describes
    # small images: 32x32 after the area-keeping resize (2x2 patch grids) keep CPU steps fast
    make_shapes_dataset(root / "shapes", n_train=8, n_val=3, seed=1, min_side=32, max_side=64, resize="32x16")
    return root


def recipe_for(root: Path, out: str, *extra: str):
    return load_recipe(RECIPE, overrides=[f"paths.data={root / 'shapes'}", f"paths.tokenizer={root / 'tok'}",
                                          f"run.output_dir={root / out}", "data.micro_batch_size=4",
                                          "optim.schedule.warmup_ratio=0.0", "optim.schedule.min_lr_ratio=1.0",
                                          "runtime.log_every=1", *extra])


ALL_ON = ("decoder.gan.start_step=1", "decoder.lpips.weight=0.1", "decoder.repa.weight=0.1")


def test_all_losses_finite_and_output_loads(world):
    res = train(recipe_for(world, "all", "optim.max_steps=3", "runtime.save_every=2", *ALL_ON), eval_limit=2)
    assert res.steps == 3 and len(res.history) == 3
    for rec in res.history:
        assert all(math.isfinite(v) for v in rec.values())
    last = res.history[-1]
    for term in ("mse", "lpips", "kl", "repa", "gan", "gan_weight", "disc", "total"):
        assert term in last, term
    assert "gan" not in res.history[0]  # the GAN joins at start_step
    ev = res.metrics["eval"]
    assert ev["images"] == 2 and "psnr_pixel" in ev and "psnr_vae" in ev and ev["psnr_better"] in ("pixel", "vae")
    assert (res.out_dir / "metrics.json").is_file()
    ck = res.checkpoint
    assert (ck / "optimizer.safetensors").is_file()  # one optimizer: the discriminator is its own group
    from viq.train import checkpoint as ckpt

    held = ckpt.read_checkpoint(ck).model
    assert any(k.startswith("discriminator.") for k in held) and any(k.startswith("pixel_decoder.") for k in held)

    tok = load_tokenizer(res.viq_dir, parts=("encoder", "decoder", "pixel_decoder"), device="cpu")
    assert tok.config.pixel_decoder is not None
    img = torch.zeros(3, 40, 56)  # not patch-aligned: the grid is padded to 3x4 patches
    codes = tok.encode_pixels([img])
    out = tok.reconstruct(codes, decoder="pixel")
    assert out[0].dtype == torch.uint8 and tuple(out[0].shape) == (48, 64, 3)


def test_mse_falls(world):
    res = train(recipe_for(world, "mse", "optim.max_steps=20", "runtime.save_every=100", "decoder.lpips.enabled=false",
                           "decoder.gan.enabled=false", "decoder.repa.enabled=false", "decoder.kl.enabled=false"),
                eval_limit=1)
    mse = [r["mse"] for r in res.history]
    assert sum(mse[-3:]) / 3 < 0.7 * sum(mse[:3]) / 3, mse


def test_resume_is_exact(world):
    full = train(recipe_for(world, "full", "optim.max_steps=4", "runtime.save_every=2", *ALL_ON), eval_limit=1)
    half = train(recipe_for(world, "split", "optim.max_steps=2", "runtime.save_every=2", *ALL_ON), eval_limit=1)
    rest = train(recipe_for(world, "split", "optim.max_steps=4", "runtime.save_every=2", *ALL_ON), resume=True,
                 eval_limit=1)
    assert rest.resumed_from is not None and rest.steps == 4 and len(rest.history) == 2
    got = half.history + rest.history
    for a, b in zip(full.history, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_model_must_describe_the_frozen_tokenizer(world):
    """model: is checked against init.ckpt's config.json: a recipe cannot silently train against another model."""
    from viq.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        train(recipe_for(world, "wrong", "optim.max_steps=1", "model.head.levels=16k", "model.vit.depth=3"))
    msg = str(e.value)
    assert "model.head.levels: recipe [8, 8, 8, 6, 5], checkpoint [8, 8, 4, 4, 4]" in msg
    assert "model.vit.depth: recipe 3, checkpoint 2" in msg and str(world / "tok") in msg
    assert not (world / "wrong").exists() or not any((world / "wrong").rglob("*.safetensors"))
