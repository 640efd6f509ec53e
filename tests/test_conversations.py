"""Data format: bad samples are reported with index and reason; labels supervise answers only."""

import json

import pytest
from PIL import Image

from viq.data import (IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, BadSample, Resize, Sample, Turn, WordTokenizer,
                      encode_conversation, load_samples, parse_resize, validate_sample)
from viq.errors import ConfigError


def _conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.png")
    return tmp_path


GOOD = {"id": "ok", "image": [{"img_path": "a.png", "resize": "384x32"}],
        "conversations": _conv("<image>\nWhat is it?", "A dot.")}

BAD = [  # (sample, expected reason fragment)
    ({"id": "c", "image": []}, "no 'conversations' list"),
    ({"id": "r", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
     "turn 0 is from 'gpt' but 'human' was expected"),
    ({"id": "a", "conversations": _conv("q", "a") + [{"from": "gpt", "value": "again"}]},
     "turn 2 is from 'gpt' but 'human' was expected"),
    ({"id": "w", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "roles are 'human' and 'gpt'"),
    ({"id": "g", "conversations": _conv("only a question")}, "no gpt turn"),
    ({"id": "n", "image": [{"img_path": "a.png"}], "conversations": _conv("no token", "a")},
     "0 <image> token(s) but 1 image(s)"),
    ({"id": "m", "conversations": _conv("<image>\nq", "a")}, "1 <image> token(s) but 0 image(s)"),
    ({"id": "f", "image": [{"img_path": "missing.png"}], "conversations": _conv("<image>", "a")},
     "image 0 not found"),
    ({"id": "z", "image": [{"img_path": "a.png", "resize": "big"}], "conversations": _conv("<image>", "a")},
     "resize 'big' must"),
    ({"id": "t", "image": [7], "conversations": _conv("<image>", "a")}, "image 0 must be"),
    ({"id": "i", "image": [{"img_path": "a.png"}], "conversations": _conv("q", "<image> a")},
     "images belong in human turns"),
    ("not an object", "a sample must be an object"),
]


def test_each_bad_sample_is_reported_with_index_and_reason(folder):
    records = [GOOD] + [s for s, _ in BAD] + [GOOD]
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n{broken json\n")
    out = load_samples(path)
    assert [s.index for s in out] == [0, len(BAD) + 1]  # good ones keep their own index, none replaced
    assert out.total == len(BAD) + 3 and len(out.bad) == len(BAD) + 1
    for k, (sample, reason) in enumerate(BAD, start=1):
        bad = out.bad[k - 1]
        assert isinstance(bad, BadSample) and bad.index == k and reason in bad.reason, (bad, reason)
        assert bad.id == (sample.get("id") if isinstance(sample, dict) else None)
    last = out.bad[-1]
    assert last.index == len(BAD) + 2 and "invalid JSON" in last.reason and "line" in last.reason
    assert "sample 1 (id c)" in str(out.bad[0])
    assert out.bad_fraction == pytest.approx(len(out.bad) / out.total)


def test_json_list_and_paths(folder, tmp_path):
    (folder / "sub").mkdir()
    (folder / "sub" / "d.json").write_text(json.dumps([GOOD]))
    assert len(load_samples(folder / "sub" / "d.json", image_root=folder)) == 1
    assert load_samples(folder / "sub" / "d.json").bad[0].reason.startswith("image 0 not found")
    assert len(load_samples(folder / "sub" / "d.json", check_files=False)) == 1
    (folder / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="list"):
        load_samples(folder / "x.json")
    with pytest.raises(ConfigError, match="jsonl"):
        load_samples(folder / "x.csv")
    s = validate_sample(GOOD, 5, folder)
    assert isinstance(s, Sample) and s.index == 5 and s.images[0].path == folder / "a.png"
    assert s.images[0].resize == Resize(base=384, patch=32) and s.images[0].source == "a.png"


def test_resize_forms():
    assert parse_resize("384x16") == Resize(384, 16)
    assert parse_resize([512, 256]).size == (512, 256)
    assert Resize(384, 16).target_size(384, 384) == (384, 384)
    w, h = Resize(96, 32).target_size(128, 48)
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 96 * 96
    assert Resize(224, 0).target_size(10, 50) == (224, 224)
    for bad in ("384", "x16", "0x16", [1, 2, 3], "384x16x2"):
        with pytest.raises(ValueError):
            parse_resize(bad)


def test_word_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.from_texts(["A large red circle on the left.", "<image>\nWhat shape is shown?"])
    assert tok.pad_id == 0 and tok.image_token_id is not None and "<image>" not in tok.vocab[7:]
    text = "A large red circle on the left."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("purple")[0] == tok.unk_id
    tok.save(tmp_path / "tok.json")
    again = WordTokenizer.load(tmp_path / "tok.json")
    assert again.vocab == tok.vocab and again.encode(text) == tok.encode(text)
    with pytest.raises(ConfigError):
        WordTokenizer.load(tmp_path / "missing.json")


def test_labels_supervise_answers_only():
    turns = [Turn("human", "<image>\nWhat shape is shown?"), Turn("gpt", "A red circle."),
             Turn("human", "And <image> here?"), Turn("gpt", "A blue square.")]
    tok = WordTokenizer.from_texts(t.text for t in turns)
    enc = encode_conversation(turns, tok, "plain")
    assert len(enc.input_ids) == len(enc.labels)
    supervised = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == "A red circle. <eos> A blue square. <eos>"
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)
    # the prompt, the questions, the role markers and images carry no loss
    prompt_end = enc.input_ids.index(tok.token_to_id("<assistant>"))
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:prompt_end + 1])


def test_image_placeholders():
    turns = [Turn("human", "<image> and <image>: same?"), Turn("gpt", "No.")]
    tok = WordTokenizer.from_texts(t.text for t in turns)
    enc = encode_conversation(turns, tok)
    assert len(enc.image_positions) == 2
    assert all(enc.input_ids[p] == tok.image_token_id and enc.labels[p] == IGNORE_INDEX
               for p in enc.image_positions)
    assert enc.input_ids.count(tok.image_token_id) == 2

    class CharTokenizer:  # any object with encode(str) -> list[int], like a transformers tokenizer
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    enc = encode_conversation(turns, CharTokenizer(), "qwen2")
    assert [enc.input_ids[p] for p in enc.image_positions] == [IMAGE_PLACEHOLDER_ID] * 2
    answer = "".join(chr(i) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX)
    assert answer == "No.<|im_end|>\n"
