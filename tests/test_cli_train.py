"""`viqctl train` end to end: what it prints while training, its JSON summary (only with --json), resume (or
nothing to resume), where a missing data file was looked for, the evaluation before step 1, usage errors."""

import json
from pathlib import Path

import pytest

from conftest import viqctl_in_process
from viq.data import make_shapes_dataset
from viq.train.recipe import load_recipe
from viq.train.run import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def viqctl(*args, check):
    p = viqctl_in_process(*args, env={"COLUMNS": "200"})
    assert p.returncode == check, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n_train=8, n_val=4, seed=3)
    return root


def test_train_prints_logs_evals_and_checkpoints(shapes, tmp_path):
    over = [f"paths.data={shapes}", f"run.output_dir={tmp_path / 'runs'}", "optim.max_steps=2",
            "runtime.log_every=1", "runtime.eval_every=1", "runtime.save_every=2", "data.num_workers=0"]
    p = viqctl("train", "--recipe", TINY, "--stage", "1", *over, check=0)
    err = p.stderr
    assert "step 1/2" in err and "lm_ce=" in err and "tokens_per_s=" in err  # the log window
    assert "eval (step 1)" in err and "eval (final)" in err and "caption_token_accuracy=" in err
    assert "checkpoint " in err and "step-00000002" in err
    assert "trained 2 steps" in p.stdout

    # resume on a finished run trains nothing more; --json gives one parseable summary
    p = viqctl("train", "--recipe", TINY, "--stage", "1", *over, "--resume", "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["steps"] == 2 and summary["resumed_from"].endswith("step-00000002")
    assert "eval (" not in p.stderr  # --json keeps stderr to the progress bar


def test_train_usage_errors_name_the_key(tmp_path):
    p = viqctl("train", "--recipe", TINY, "--stage", "1", "optim.lrr=1e-3", check=2)
    assert "optim.lrr" in p.stderr and "optim.lr" in p.stderr and "Traceback" not in p.stderr
    p = viqctl("train", "--recipe", TINY, "--stage", "9", check=2)
    assert "no stage '9'" in p.stderr
    p = viqctl("train", "--recipe", tmp_path / "none.yaml", check=2)
    assert "recipe not found" in p.stderr
    p = viqctl("train", "--recipe", TINY, "--stage", "1", "--print-config", check=0)
    assert "stage: '1'" in p.stdout or "stage: 1" in p.stdout


def test_resume_and_summary_are_said(shapes, tmp_path):
    over = [f"paths.data={shapes}", f"run.output_dir={tmp_path / 'runs'}", "runtime.save_every=1",
            "data.num_workers=0", "data.val_path=null", "runtime.eval_every=null"]
    p = viqctl("train", "--recipe", TINY, "--stage", "1", *over, "optim.max_steps=1", "--resume", check=0)
    assert "nothing to resume" in p.stderr
    assert "trained 1 steps" in p.stdout and not p.stdout.lstrip().startswith("{")  # no JSON without --json
    p = viqctl("train", "--recipe", TINY, "--stage", "1", *over, "optim.max_steps=2", "--resume", check=0)
    assert "step 1 of 2 done" in p.stderr and "continuing at step 2" in p.stderr
    assert "resumed from step 1" in p.stdout


def test_a_missing_data_file_names_the_command_and_the_path(tmp_path):
    p = viqctl("train", "--recipe", TINY, "--stage", "1", f"paths.data={tmp_path / 'nodata'}",
               f"run.output_dir={tmp_path / 'runs'}", check=2)
    assert "viqctl shapes" in p.stderr and str(tmp_path / "nodata") in p.stderr and "Traceback" not in p.stderr


def test_the_evaluation_before_step_one_reports_progress(shapes, tmp_path):
    events = []
    rec = load_recipe(TINY, "1", [f"paths.data={shapes}", f"run.output_dir={tmp_path / 'r'}", "optim.max_steps=1",
                                  "data.num_workers=0", "runtime.eval_every=null"])
    train(rec, progress=events.append, eval_limit=2)
    kinds = [e.kind for e in events]
    first_step = kinds.index("step")
    assert "eval_start" in kinds[:first_step] and "eval_progress" in kinds[:first_step]
    start = events[kinds.index("eval_start")]
    assert start.metrics["label"] == "initial" and start.metrics["samples"] == 2 and "evaluating 2" in start.message
    ticks = [e.metrics for e in events[:first_step] if e.kind == "eval_progress"]
    assert ticks[-1]["done"] == ticks[-1]["total"] == 2


def test_missing_downloads_are_listed_at_once_with_one_command(tmp_path):
    from viq.errors import HubError
    from viq.train.weight_paths import resolve_recipe_weights

    rec = load_recipe(TINY.parent / "fsq16k.yaml", None, [f"paths.models={tmp_path / 'models'}",
                                                         f"paths.data={tmp_path}"])
    with pytest.raises(HubError) as info:
        resolve_recipe_weights(rec)
    msg = str(info.value)
    command = msg.split("fetch them all with: ")[1]
    needed = [n for n in ("viq-anyres-vit-g", "siglip2-g", "qwen-image-vae", "qwen2.5-0.5b") if n in msg]
    assert len(needed) == 4 and all(n in command for n in needed) and command.startswith("viqctl download ")
