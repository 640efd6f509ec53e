"""Codes as LLM tokens: the layout, the exact inverse, Parquet shards that resume, the CLI, and the
tokens added to a Qwen2.5 tokenizer (Qwen2TokenizerFast on a tiny vocabulary built here)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.errors import ConfigError, StoreError
from viq.store import CodeStore, CodeStoreWriter, finalize_store
from viq.tokenizer import load_tokenizer
from viq.tokens import (TokenLayout, add_to_tokenizer, codes_to_tokens, iter_token_shards, read_layout,
                        tokens_to_codes, write_token_shards)

K = 15360


def make_store(root: Path, n=7, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    grids = {}
    with CodeStoreWriter(root, {"fingerprint": "f", "levels": [8, 8, 8, 6, 5], "codebook_size": K},
                         "native", rows_per_shard=3) as w:
        for i in range(n):
            h, wd = int(rng.integers(1, 5)), int(rng.integers(1, 6))
            codes = rng.integers(0, K, (h, wd, 4))
            w.add(f"img{i}", f"/x/{i}.png", f"sha{i}", wd * 16, h * 16, codes)
            grids[f"img{i}"] = codes
    finalize_store(root)
    return grids


def test_layout_and_exact_inverse():
    layout = TokenLayout(1000, K)
    codes = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    t = codes_to_tokens(codes, layout)
    assert t[0] == layout.boi == 1000 + K and t[-1] == layout.eoi == 1001 + K
    assert list(t[1:14]) == [1000 + v for v in range(12)] + [layout.eol]
    assert len(t) == layout.sequence_length(2, 3) == 2 * 13 + 2 and layout.vocab_end == 1000 + K + 3
    assert np.array_equal(tokens_to_codes(t, layout), codes)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.integers(0, K, (int(rng.integers(1, 9)), int(rng.integers(1, 9)), 4))
        assert np.array_equal(tokens_to_codes(codes_to_tokens(c, layout), layout), c)


@pytest.mark.parametrize("mutate,words", [
    (lambda t, L: t[1:], "start with BOI"), (lambda t, L: t[:-1], "end with EOI"),
    (lambda t, L: np.delete(t, 3), "same number"), (lambda t, L: np.delete(t, len(t) - 2), "must be EOL"),
    (lambda t, L: np.where(np.arange(len(t)) == 1, L.offset - 1, t), "outside"),
])
def test_malformed_tokens_are_refused(mutate, words):
    layout = TokenLayout(10, K)
    t = codes_to_tokens(np.zeros((2, 2, 4), int), layout)
    with pytest.raises(ConfigError, match=words):
        tokens_to_codes(mutate(t, layout), layout)


def test_codes_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="outside"):
        codes_to_tokens(np.full((1, 1, 4), K), TokenLayout(0, K))
    with pytest.raises(ConfigError, match="shape"):
        codes_to_tokens(np.zeros((2, 2, 3)), TokenLayout(0, K))


def test_shards_round_trip_and_resume(tmp_path):
    grids = make_store(tmp_path / "store")
    layout = TokenLayout(151665, K)
    out = tmp_path / "tokens"
    first = write_token_shards(tmp_path / "store", out, layout, rows_per_shard=3)
    assert first["shards_written"] == 3 and first["images"] == 7
    got = dict(iter_token_shards(out))
    assert sorted(got) == sorted(grids)
    for i, t in got.items():
        assert np.array_equal(tokens_to_codes(t, read_layout(out)), grids[i])
    table = pq.read_table(out / "tokens-000000.parquet")
    assert table.column_names == ["id", "h", "w", "tokens"]
    # a kill leaves whole shards only: a rerun keeps them and writes the rest
    (out / "tokens-000002.parquet").unlink()
    (out / ".tmp-leftover").write_bytes(b"half")
    again = write_token_shards(tmp_path / "store", out, layout, rows_per_shard=3)
    assert again["shards_written"] == 1 and again["shards_kept"] == 2 and dict(iter_token_shards(out)).keys() == got.keys()
    with pytest.raises(StoreError, match="another layout"):
        write_token_shards(tmp_path / "store", out, TokenLayout(0, K), rows_per_shard=3)


def test_reconstruct_from_tokens_equals_reconstruct_from_codes(tmp_path):
    random_model_dir(tmp_path / "m", tiny_config("16k"), seed=0)
    tok = load_tokenizer(tmp_path / "m", device="cpu")
    codes = torch.randint(0, tok.codebook_size, (2, 3, 4))
    layout = TokenLayout(50, tok.codebook_size)
    back = torch.from_numpy(tokens_to_codes(codes_to_tokens(codes.numpy(), layout), layout))
    assert torch.equal(tok.reconstruct([codes])[0], tok.reconstruct([back])[0])


def test_cli_tokens(tmp_path):
    make_store(tmp_path / "store", n=4)
    cmd = [sys.executable, "-m", "viqctl", "tokens", str(tmp_path / "store"), "--offset", "7", "--out",
           str(tmp_path / "t"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["boi"] == 7 + K and r["images"] == 4 and json.loads((tmp_path / "t" / "tokens.json").read_text())
    bad = subprocess.run([sys.executable, "-m", "viqctl", "tokens", str(tmp_path / "nostore"), "--offset", "7",
                          "--out", str(tmp_path / "t3")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def qwen_tokenizer():
    transformers = pytest.importorskip("transformers")
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "a", "b", "c", "h", "i", "\u0120", "hi", "\u0120a"])}
    return transformers.Qwen2TokenizerFast(vocab=vocab, merges=[("h", "i"), ("\u0120", "a")])


def test_add_tokens_to_a_qwen2_tokenizer():
    tok = qwen_tokenizer()
    n = len(tok)
    layout = add_to_tokenizer(tok, K)
    assert layout.offset == n and len(tok) == layout.vocab_end
    assert add_to_tokenizer(tok, K) == layout and len(tok) == layout.vocab_end  # idempotent
    codes = np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]])
    ids = codes_to_tokens(codes, layout).tolist()
    text = tok.decode(ids)
    assert text.startswith("<viq_boi><viq_1><viq_2>") and text.endswith("<viq_eol><viq_eoi>")
    # text around the image tokenizes to the same ids: the added tokens are whole tokens
    enc = tok("hi" + text + " a").input_ids
    assert enc[0] == tok.convert_tokens_to_ids("hi") and enc[1:-1] == ids
    assert np.array_equal(tokens_to_codes(enc[1:-1], layout), codes)


def test_token_shards_load_as_a_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="checks the shards with datasets.load_dataset")
    grids = make_store(tmp_path / "store", n=5)
    layout = TokenLayout(100, K)
    write_token_shards(tmp_path / "store", tmp_path / "tok", layout, rows_per_shard=2)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "tok" / "tokens-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["id"]) == sorted(grids)
    for row in ds:
        assert np.array_equal(tokens_to_codes(row["tokens"], layout), grids[row["id"]])


def test_cli_tokens_with_a_tokenizer_folder(tmp_path):
    from transformers import AutoTokenizer

    make_store(tmp_path / "store", n=2)
    base = qwen_tokenizer()
    base.save_pretrained(str(tmp_path / "llm"))
    n = len(base)
    cmd = [sys.executable, "-m", "viqctl", "tokens", str(tmp_path / "store"), "--tokenizer", str(tmp_path / "llm"),
           "--save-tokenizer", str(tmp_path / "llm-viq"), "--out", str(tmp_path / "t"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["offset"] == n
    extended = AutoTokenizer.from_pretrained(str(tmp_path / "llm-viq"))
    assert len(extended) == n + K + 3 and extended.convert_tokens_to_ids("<viq_eol>") == n + K + 2
    both = subprocess.run(cmd[:7] + ["--offset", "3", "--out", str(tmp_path / "u")], capture_output=True, text=True,
                          timeout=300)
    assert both.returncode == 2 and "exactly one" in both.stderr
