"""Resume is exact: continuing from a checkpoint gives the same losses and weights as never stopping."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from viq.data import make_shapes_dataset
from viq.train import checkpoint as ckpt
from viq.train.recipe import load_recipe
from viq.train.run import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def recipe(root: Path, out: str, *extra):
    return load_recipe(TINY, None, [
        f"paths.data={root / 'shapes'}", f"run.output_dir={root / out}", "data.val_path=null", "runtime.eval_every=null",
        "optim.max_steps=6", "optim.grad_accum=2", "data.micro_batch_size=2", "runtime.save_every=3",
        "runtime.keep_last=3", "runtime.log_every=2", "data.num_workers=0", *extra])


@pytest.mark.parametrize("extra", [
    [],
    # DataLoader worker processes, and a frozen LLM with DoRA adapters (what the 2-2 stage trains)
    ["data.num_workers=2", "llm.trainable=false", "llm.lora={enabled: true, r: 4, alpha: 8, dropout: 0.0, dora: true}"],
], ids=["in-process", "workers-dora"])
def test_resume_gives_the_same_losses_and_weights(tmp_path, extra):
    make_shapes_dataset(tmp_path / "shapes", n_train=16, n_val=0, seed=5)  # 4 steps an epoch: crosses one
    full = train(recipe(tmp_path, "a", *extra))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "a" / "checkpoints")] == \
        ["step-00000003", "step-00000006"]
    # a run that stopped after step 3: only its checkpoint exists
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000003", tmp_path / "b" / "checkpoints" / "step-00000003")
    resumed = train(recipe(tmp_path, "b", *extra), resume=True)
    assert resumed.resumed_from.name == "step-00000003"
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert resumed.history == full.history[3:]  # every loss term, LR and grad norm, bit for bit
    a, b = load_file(full.state_path), load_file(resumed.state_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=0, seed=5)
    r = train(recipe(tmp_path, "c", "optim.max_steps=1", "optim.grad_accum=1"), resume=True)
    assert r.resumed_from is None and r.steps == 1
