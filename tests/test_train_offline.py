"""The offline MLLM stage (run.task: mllm_offline) on a tiny random tokenizer's code store."""

import json
import math
from pathlib import Path

import pytest
import torch

from viq.config import tiny_config
from viq.data import make_shapes_dataset
from viq.demo import random_model_dir
from viq.encode import EncodeOptions, encode_to_store
from viq.errors import StoreError
from viq.sources import collect_sources
from viq.tokenizer import load_tokenizer
from viq.train.progress import ProgressEvent
from viq.train.stages.offline import group_rows
from viq.train.recipe import load_recipe
from viq.train.run import train
from viq.weights.io import read_tensors

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mllm-offline.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-stage")
    random_model_dir(root / "models" / "viq-tiny", tiny_config("16k"), seed=0)
    data = root / "data"
    make_shapes_dataset(data, n_train=12, n_val=4, seed=1, min_side=32, max_side=64, resize=None)
    tok = load_tokenizer(root / "models" / "viq-tiny", parts=("encoder",), device="cpu")
    summary = encode_to_store(collect_sources([str(data)]), tok, data / "codes", {},
                              EncodeOptions(workers=1))
    assert summary.encoded == 16 and not summary.failed
    return root


def recipe_for(root: Path, out: str, *extra: str):
    return load_recipe(RECIPE, "tiny", [f"paths.models={root / 'models'}", f"paths.data={root / 'data'}",
                                        f"run.output_dir={root / out}", "data.val_path=${data}/val.jsonl",
                                        "optim.schedule.warmup_ratio=0.0", "optim.schedule.min_lr_ratio=1.0",
                                        *extra])


def test_group_rows_mirrors_packing():
    # rows of 10: [6] [6 3] [9] [5 5] -> 2 rows per batch: [[a, b, c], [d, e, f]]
    lengths = [6, 6, 3, 9, 5, 5, None, 11]
    assert group_rows(range(8), lengths, 10, 2) == [[0, 1, 2], [3, 4, 5]]
    assert group_rows(range(8), lengths, 10, 1) == [[0], [1, 2], [3], [4, 5]]


def test_trains_and_writes_outputs(world):
    events: list[ProgressEvent] = []
    res = train(recipe_for(world, "run", "optim.max_steps=4", "runtime.save_every=2"), progress=events.append,
                eval_limit=4)
    assert res.steps == 4 and len(res.history) == 4 and res.viq_dir is None
    for rec in res.history:
        assert math.isfinite(rec["loss"]) and rec["tokens"] > 0 and rec["supervised"] > 0 and rec["lr"] > 0
    assert all(e.metrics["tokens_per_s"] > 0 for e in events if e.kind == "log")
    kinds = {e.kind for e in events}
    assert {"start", "step", "log", "save", "eval", "end"} <= kinds
    m = json.loads((res.out_dir / "metrics.json").read_text())
    assert math.isfinite(m["final_loss"]) and 0.0 <= m["eval"]["token_accuracy"] <= 1.0
    state = read_tensors(res.state_path)
    assert any(k.startswith("image_encoder.projector.") for k in state)
    assert any("lora_" in k for k in state)
    assert not any(k.startswith("image_encoder.embedder.") for k in state)  # frozen: not saved
    assert (res.out_dir / "tokenizer.json").is_file() and res.checkpoint.name.endswith("4")


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def progress(ev: ProgressEvent):
        if ev.kind == "step" and ev.step == step:
            raise Interrupt  # as a killed run: step - 1 was checkpointed, this one is lost
    return progress


@pytest.mark.parametrize("schedule", [[], ["optim.schedule.warmup_steps=2", "optim.schedule.min_lr_ratio=0.1"]],
                         ids=["constant", "warmup-cosine"])
def test_resume_is_exact(world, schedule):
    args = ["optim.max_steps=6", "runtime.save_every=2", *schedule]
    if schedule:
        args.insert(0, "optim.schedule.warmup_ratio=null")
    tag = "cos" if schedule else "const"
    full = train(recipe_for(world, f"full-{tag}", *args), eval_limit=1)
    with pytest.raises(Interrupt):
        train(recipe_for(world, f"split-{tag}", *args), progress=stop_at(5), eval_limit=1)
    rest = train(recipe_for(world, f"split-{tag}", *args), resume=True, eval_limit=1)
    assert rest.resumed_from is not None and rest.resumed_from.name.endswith("4")
    assert rest.steps == 6 and len(rest.history) == 2
    assert [r["lr"] for r in rest.history] == [r["lr"] for r in full.history[4:]]
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history[4:]]  # bit for bit on CPU
    a, b = read_tensors(full.state_path), read_tensors(rest.state_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_image_id_is_a_store_error(world, tmp_path):
    rows = [json.loads(x) for x in (world / "data" / "train.jsonl").read_text().splitlines()]
    rows[0]["image"][0]["img_path"] = "images/train/not-encoded.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StoreError, match="not-encoded.png.*viqctl encode"):
        train(recipe_for(world, "bad", f"data.path={bad}", "optim.max_steps=1"))


def test_chaining_and_captions(world):
    first = train(recipe_for(world, "pre", "optim.max_steps=2", "data.val_path=null", "runtime.eval_every=null"))
    # a second recipe starts from the first run's projector and LoRA (LLaVA pretrain -> finetune)
    second = train(recipe_for(world, "fine", "optim.max_steps=1", "data.val_path=null", "runtime.eval_every=null",
                              f"llm.init_from={first.out_dir}", "optim.name=sgd", "optim.lr=1e-12"))
    a, b = read_tensors(first.state_path), read_tensors(second.state_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    from viq.mllm.caption import caption_store, load_offline_run

    run = load_offline_run(first.out_dir)
    got = list(caption_store(world / "data" / "codes", run, limit=2, max_new_tokens=4))
    assert len(got) == 2 and all(isinstance(t, str) for _, t in got)
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "viqctl", "caption", str(world / "data" / "codes"), "--mllm",
                        str(first.out_dir), "--limit", "1", "--max-new-tokens", "3", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads(p.stdout)["captions"]) == 1
    p = subprocess.run([sys.executable, "-m", "viqctl", "caption", str(world / "data" / "codes"), "--mllm",
                        str(world / "data")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "not a finished offline MLLM run" in p.stderr


def test_model_must_be_the_embedders_architecture(world):
    """The recipe's model: is checked against init.ckpt's config.json (a 4k recipe on a 16k embedder)."""
    from viq.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.head.levels: recipe \[8, 8, 4, 4, 4\], checkpoint \[8, 8, 8, 6, 5\]"):
        train(recipe_for(world, "wrong-arch", "optim.max_steps=1", "model.head.levels=4k"))
