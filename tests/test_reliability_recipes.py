"""Hostile recipes: refused with one line (exit 2), fast, before anything runs."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from viq.errors import RecipeError
from viq.train.recipe import load_recipe

BASE = """paths: {root: /data}
data: {path: "${root}/train.jsonl"}
llm: {name_or_path: "${root}/qwen"}
"""


def refused(tmp_path, text: str | bytes, match: str, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=match) as exc:
        load_recipe(path, overrides=list(overrides))
    assert time.perf_counter() - t0 < 1.0  # well under a second, whatever the file holds
    assert exc.value.exit_code == 2
    return str(exc.value)


def test_alias_bomb_is_refused_before_it_is_built(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    refused(tmp_path, BASE + "bomb:\n  " + "\n  ".join(lines) + "\noptim: {max_steps: 1}\n", "expands to more than")


def test_doubling_substitution_is_capped(tmp_path):
    paths = ["  v0: " + "x" * 64] + [f'  v{i}: "${{v{i - 1}}}${{v{i - 1}}}"' for i in range(1, 60)]
    text = "paths:\n" + "\n".join(paths) + '\ndata: {path: "${v59}"}\nllm: {name_or_path: q}\noptim: {max_steps: 1}\n'
    refused(tmp_path, text, "expands to more than")


def test_deep_nesting_is_refused(tmp_path):
    refused(tmp_path, BASE + "x: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than")
    refused(tmp_path, BASE + "x: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n", "nested more than")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    msg = refused(tmp_path, BASE.encode() + b"run: {name: caf\xe9}\n", "not UTF-8")
    assert "line 4" in msg


def test_a_key_given_twice_is_refused(tmp_path):
    text = BASE + "optim: {max_steps: 10, lr: 1.0e-3}\noptim: {max_steps: 20}\n"
    refused(tmp_path, text, "line 5: key 'optim' given twice")
    refused(tmp_path, BASE + "optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n  max_steps: 1\n", "'lr' given twice")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    refused(tmp_path, BASE + f"optim: {{max_steps: 1, lr: {value}}}\n", "optim.lr.*not a finite number")
    refused(tmp_path, BASE + "optim: {max_steps: 1}\n", "not a finite number", overrides=[f"optim.lr={value}"])


@pytest.mark.parametrize("field,value", [("optim.max_steps", 10 ** 12), ("runtime.save_every", 10 ** 30),
                                         ("optim.schedule.warmup_steps", 2 ** 70)])
def test_out_of_range_step_counts_are_refused(tmp_path, field, value):
    refused(tmp_path, BASE + "optim: {max_steps: 1}\n", "out of range", overrides=[f"{field}={value}"])


@pytest.mark.parametrize("value,match", [('"/models/q\\0wen"', "NUL|control character"),
                                         ('"' + "q" * 300 + '"', "too long"),
                                         ('"~no_such_user_viq/qwen"', "no user"),
                                         ('"/models/\\nqwen"', "control character")])
def test_a_malicious_llm_path_is_refused_at_load(tmp_path, value, match):
    text = f"paths: {{root: /data}}\ndata: {{path: /data/train.jsonl}}\nllm: {{name_or_path: {value}}}\n" \
           "optim: {max_steps: 1}\n"
    refused(tmp_path, text, match)


def test_the_cli_says_one_line_and_exits_2(tmp_path):
    from viqctl.__main__ import app

    path = tmp_path / "r.yaml"
    path.write_text(BASE + "optim: {max_steps: 1, lr: .inf}\n")
    r = CliRunner().invoke(app, ["train", "--recipe", str(path)])
    assert r.exit_code == 2 and "not a finite number" in r.output and "Traceback" not in r.output
