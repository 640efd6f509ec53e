"""Bad samples during training: reported with index and reason, skipped, counted; never replaced."""

import json
from pathlib import Path

from viq.data import make_shapes_dataset
from viq.train.recipe import load_recipe
from viq.train.run import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def test_bad_samples_are_skipped_and_counted(tmp_path):
    ds = make_shapes_dataset(tmp_path / "shapes", n_train=12, n_val=0, seed=4)
    lines = ds.train.read_text().splitlines()
    (tmp_path / "shapes" / json.loads(lines[2])["image"][0]["img_path"]).write_bytes(b"\x89PNG broken")
    bad = json.loads(lines[7])
    bad["image"] = []  # <image> token without an image: caught when the file is read
    lines[7] = json.dumps(bad)
    ds.train.write_text("\n".join(lines) + "\n")
    recipe = load_recipe(TINY, "1", [f"paths.data={tmp_path / 'shapes'}", f"run.output_dir={tmp_path / 'runs'}",
                                     "data.val_path=null", "runtime.eval_every=null", "optim.max_steps=3",
                                     "data.micro_batch_size=4", "data.shuffle=false", "data.max_bad_fraction=0.2",
                                     "data.num_workers=0"])
    steps = []
    result = train(recipe, progress=lambda e: steps.append(e.sample_indices) if e.kind == "step" else None)
    assert any(s.startswith("sample 7") and "image" in s for s in result.skipped)
    assert any(s.startswith("sample 2") for s in result.skipped)
    assert result.metrics["skipped_samples"] == 2
    # in file order: sample 2 is dropped from its micro-batch, nothing is swapped in for it
    assert steps == [[0, 1, 3], [4, 5, 6, 8], [0, 1, 3]]
    assert result.history[0]["loss"] > 0
