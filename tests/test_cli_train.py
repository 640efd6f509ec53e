"""`viqctl train` end to end: what it prints while training, its JSON summary, resume and usage errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from viq.data import make_shapes_dataset

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def viqctl(*args, check):
    p = subprocess.run([sys.executable, "-m", "viqctl", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
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
