"""Weights folders viq writes carry a model card (README.md), like save_pretrained output."""

import json

import pytest

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.tokenizer import load_tokenizer
from viq.weights.card import model_card


def test_convert_output_has_a_card_with_config_digest_levels_and_loading(tmp_path):
    from viq.weights.convert import convert

    random_model_dir(tmp_path / "src", tiny_config("16k"), seed=0)
    report = convert(tmp_path / "src", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: viq")
    assert f"source checkpoint sha256 | `{report.source_sha256}`" in card
    assert "FSQ levels: `[8, 8, 8, 6, 5]` (codebook size 15360)" in card
    assert "viq.load_tokenizer(" in card and "viqctl encode" in card
    for part, info in meta["parts"].items():
        assert info["sha256"] in card
    assert json.dumps(meta["model"], indent=2) in card  # the whole config
    load_tokenizer(tmp_path / "out", parts=("encoder",), device="cpu")  # the card does not disturb loading


def test_save_pretrained_writes_a_card(tmp_path):
    random_model_dir(tmp_path / "m", tiny_config("2k"), seed=0)
    tok = load_tokenizer(tmp_path / "m", parts=("encoder",), device="cpu")
    tok.save_pretrained(tmp_path / "saved", source_info={"kind": "test", "recipe": "a|b"})
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "| kind | test |" in card and "a\\|b" in card and str(tok.levels) in card


def test_card_of_minimal_metadata():
    text = model_card({"model": {"name": "x"}})
    assert "# x" in text and "kind | unknown" in text
