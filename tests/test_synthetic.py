"""Synthetic shapes: deterministic, varied, and every caption states what the image shows."""

import json

import numpy as np
import pytest
from PIL import Image

from viq.data import (WordTokenizer, caption, caption_vocabulary, load_samples, make_shapes_dataset,
                      parse_caption)
from viq.data.synthetic import COLOURS, POSITIONS, ShapeAttributes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=60, n_val=12, seed=7)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(root, row):
    return np.asarray(Image.open(root / row["image"][0]["img_path"]).convert("RGB"))


def test_deterministic_for_a_seed(shapes, tmp_path):
    again = make_shapes_dataset(tmp_path / "a", n_train=60, n_val=12, seed=7)
    assert again.train.read_text() == shapes.train.read_text()
    assert again.val.read_text() == shapes.val.read_text()
    for row in _rows(shapes.train)[:10]:
        assert np.array_equal(_pixels(shapes.root, row), _pixels(again.root, row))
    other = make_shapes_dataset(tmp_path / "b", n_train=60, n_val=0, seed=8)
    assert other.train.read_text() != shapes.train.read_text()


def test_format_and_variety(shapes):
    good = load_samples(shapes.train)
    assert len(good) == 60 and not good.bad
    assert len(load_samples(shapes.val)) == 12
    rows = _rows(shapes.train)
    sizes = {(r["meta"]["width"], r["meta"]["height"]) for r in rows}
    assert len(sizes) > 40
    assert any(w % 16 for w, _ in sizes) and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert all(48 <= v <= 128 for s in sizes for v in s)
    assert {r["meta"]["shape"] for r in rows} == {"circle", "square", "triangle", "cross"}
    two_tone = ["/" in r["meta"]["background"] for r in rows]
    assert any(two_tone) and not all(two_tone)
    r = rows[0]
    assert r["image"][0]["resize"] == "96x32"
    assert r["conversations"][0]["value"].startswith("<image>\n") and r["conversations"][1]["from"] == "gpt"


def test_caption_matches_pixels(shapes):
    for row in _rows(shapes.train):
        meta = row["meta"]
        attrs = ShapeAttributes(meta["shape"], meta["colour"], meta["size"], meta["position"])
        answer = row["conversations"][1]["value"]
        assert answer == caption(attrs) and parse_caption(answer) == attrs
        px = _pixels(shapes.root, row)
        h, w, _ = px.shape
        mask = np.all(px == COLOURS[attrs.colour], axis=-1)
        assert mask.sum() > 0
        ys, xs = np.nonzero(mask)
        # the shape's pixels sit around the stated position (centroid within 12% of the short side)
        fx, fy = POSITIONS[attrs.position]
        tol = 0.12 * min(w, h)
        assert abs(xs.mean() - fx * w) < tol and abs(ys.mean() - fy * h) < tol
        # large shapes cover clearly more of the short side than small ones
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert (extent > 0.4 * min(w, h)) == (attrs.size == "large")


def test_vocabulary_covers_every_text(shapes):
    tok = WordTokenizer.from_texts(caption_vocabulary())
    for row in _rows(shapes.train):
        for turn in row["conversations"]:
            assert tok.unk_id not in tok.encode(turn["value"])
    assert parse_caption("A small red square.") is None  # no position
