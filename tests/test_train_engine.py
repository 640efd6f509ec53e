"""The one training engine: accumulation is exact for every stage, boundaries are the optimizer's
steps, the logged LR is the step's own, and Ctrl-C says what was kept."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from viq.config import tiny_config
from viq.data import make_shapes_dataset
from viq.demo import random_model_dir
from viq.encode import EncodeOptions, encode_to_store
from viq.sources import collect_sources
from viq.tokenizer import load_tokenizer
from viq.train.engine import TrainingInterrupted
from viq.train.recipe import load_recipe
from viq.train.run import train
from viq.weights.io import read_tensors

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SGD = ["optim.name=sgd", "optim.grad_clip=null", "optim.schedule.warmup_ratio=0.0",
       "optim.schedule.min_lr_ratio=1.0", "data.shuffle=false", "optim.max_steps=1", "runtime.save_every=100"]


def same_text(data: Path) -> None:
    """Every sample gets the first sample's conversation: equal token counts in every micro-batch, so
    the mean of two micro-batch means is the mean over both (what accumulation must reproduce)."""
    for split in ("train", "val"):
        f = data / f"{split}.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        for r in rows:
            r["conversations"] = rows[0]["conversations"]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_shapes_dataset(root / "shapes", n_train=8, n_val=2, seed=3, min_side=32, max_side=32, resize="32x16")
    same_text(root / "shapes")
    random_model_dir(root / "models" / "viq-tiny", tiny_config("16k"), seed=0)
    # the decoder stage's tokenizer: the architecture tiny-decoder.yaml describes (tiny.yaml's)
    random_model_dir(root / "models" / "tiny-tokenizer", load_recipe(RECIPES / "tiny-decoder.yaml").model, seed=0)
    make_shapes_dataset(root / "coded", n_train=8, n_val=2, seed=4, min_side=32, max_side=32, resize=None)
    same_text(root / "coded")
    tok = load_tokenizer(root / "models" / "viq-tiny", parts=("encoder",), device="cpu")
    encode_to_store(collect_sources([str(root / "coded")]), tok, root / "coded" / "codes", {},
                    EncodeOptions(workers=1))
    return root


def tokenizer_recipe(root, out, *extra):
    return load_recipe(RECIPES / "tiny.yaml", None, [
        f"paths.data={root / 'shapes'}", f"run.output_dir={root / out}", "data.val_path=null",
        "runtime.eval_every=null", "model.head.slots=1", "data.num_workers=0", *SGD, *extra])


def decoder_recipe(root, out, *extra):
    return load_recipe(RECIPES / "tiny-decoder.yaml", None, [
        f"paths.data={root / 'shapes'}", f"paths.tokenizer={root / 'models' / 'tiny-tokenizer'}",
        f"run.output_dir={root / out}", "data.val_path=null", "decoder.lpips.enabled=false",
        "decoder.gan.enabled=false", "decoder.repa.enabled=false", *SGD, *extra])


def offline_recipe(root, out, *extra):
    return load_recipe(RECIPES / "mllm-offline.yaml", "tiny", [
        f"paths.models={root / 'models'}", f"paths.data={root / 'coded'}", f"run.output_dir={root / out}",
        "data.val_path=null", "llm.max_length=48", *SGD, *extra])  # a row or two per sample



# the offline stage's LoRA starts at B = 0 and its projector gradients are small: a large SGD step
# makes one update visible above the tolerance
@pytest.mark.parametrize("make,b,lr", [(tokenizer_recipe, 2, 1e-3), (decoder_recipe, 2, 1e-3), (offline_recipe, 1, 10.0)],
                         ids=["tokenizer", "decoder", "mllm_offline"])
def test_accumulating_two_micro_batches_is_one_double_batch(world, make, b, lr):
    name, lr = make.__name__, f"optim.lr={lr}"
    ga2 = train(make(world, f"{name}-ga2", f"data.micro_batch_size={b}", "optim.grad_accum=2", lr),
                eval_at_start=False)
    ga1 = train(make(world, f"{name}-ga1", f"data.micro_batch_size={2 * b}", "optim.grad_accum=1", lr),
                eval_at_start=False)
    half = train(make(world, f"{name}-half", f"data.micro_batch_size={b}", "optim.grad_accum=1", lr),
                 eval_at_start=False)
    a, c, h = read_tensors(ga2.state_path), read_tensors(ga1.state_path), read_tensors(half.state_path)
    assert a.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6, msg=k)
    assert ga2.history[0]["loss"] == pytest.approx(ga1.history[0]["loss"], rel=1e-5)
    # the comparison can fail: half the data is a different update
    assert any(not torch.allclose(a[k], h[k], rtol=1e-4, atol=1e-6) for k in a)


def test_one_optimizer_step_per_accumulation(world, monkeypatch):
    calls = []
    real = torch.optim.SGD.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    res = train(offline_recipe(world, "count", "optim.grad_accum=2", "optim.max_steps=3"))
    assert res.steps == 3 and len(calls) == 3  # 6 micro-batches, 3 optimizer steps


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available(),
                    reason="needs DeepSpeed and a GPU: runtime.deepspeed_zero refuses CPUs, and DeepSpeed's CPU "
                           "accelerator hangs at engine start here (and prints to stdout on import), so it is "
                           "not in the test extra")
def test_deepspeed_counts_one_engine_step_per_accumulation(world, tmp_path):
    res = train(offline_recipe(world, "ds", "optim.name=adamw", "optim.grad_accum=2", "optim.max_steps=3",
                               "runtime.deepspeed_zero=1", "runtime.precision=bf16"))
    assert res.steps == 3
    ck = res.checkpoint
    assert ck is not None and json.loads((ck / "state.json").read_text())["step"] == 3


def test_logged_lr_is_the_steps_own(world):
    rec = tokenizer_recipe(world, "lr", "optim.max_steps=4", "optim.schedule.warmup_ratio=null",
                           "optim.schedule.warmup_steps=2", "optim.schedule.min_lr_ratio=0.1")
    res = train(rec, eval_at_start=False)
    want = [rec.optim.lr * rec.optim.schedule.lr_factor(i, 4) for i in range(4)]
    assert [r["lr"] for r in res.history] == pytest.approx(want)
    assert res.history[0]["lr"] == pytest.approx(0.0) or res.history[0]["lr"] < rec.optim.lr


def test_resume_says_what_it_resumed_and_refuses_another_task(world):
    events = []
    first = train(offline_recipe(world, "res", "optim.max_steps=2", "runtime.save_every=1"))
    again = train(offline_recipe(world, "res", "optim.max_steps=3", "runtime.save_every=1"), resume=True,
                  progress=events.append)
    assert again.resumed_step == 2 and again.resumed_from == first.checkpoint
    said = [e.message for e in events if e.kind == "resume"]
    assert said and "step 2 of 3" in said[0] and "continuing at step 3" in said[0]
    # nothing to resume: said so
    events.clear()
    train(offline_recipe(world, "fresh", "optim.max_steps=1"), resume=True, progress=events.append)
    assert any("nothing to resume" in e.message for e in events if e.kind == "resume")
    # a checkpoint of another task in the same folder is refused
    from viq.errors import ConfigError

    with pytest.raises(ConfigError, match="run.task mllm_offline"):
        train(tokenizer_recipe(world, first.out_dir.relative_to(world), "optim.max_steps=3"), resume=True,
              eval_at_start=False)


def test_ctrl_c_says_what_was_kept(world):
    def stop(ev):
        if ev.kind == "step" and ev.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(offline_recipe(world, "ctrlc", "optim.max_steps=4", "runtime.save_every=1"), progress=stop)
    msg = info.value.message
    assert "step-00000001" in msg and "--resume" in msg and info.value.checkpoint.name == "step-00000001"


def test_distill_max_res_leaves_large_images_out():
    from viq.train.model import distill_images

    ims = [torch.zeros(3, 32, 32), torch.zeros(3, 64, 64)]
    assert distill_images(ims, None) is None
    assert distill_images(ims, 32).tolist() == [True, False]
