"""viqctl embed / viq.embed: features streamed to shards (bounded by bytes), bf16, resume after a
kill, and one .safetensors file written header-first from the shards."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.embed import embed_store, read_features
from viq.errors import ConfigError, StoreError
from viq.store import CodeStore, CodeStoreWriter, finalize_store
from viq.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    random_model_dir(root / "m", tiny_config("16k"), seed=0)
    tok = load_tokenizer(root / "m", parts=("decoder",), device="cpu")
    rng = np.random.default_rng(0)
    with CodeStoreWriter(root / "store", tok.identity() | {"fingerprint": "fp"}, "native", rows_per_shard=4) as w:
        for i in range(9):
            h, wd = int(rng.integers(1, 4)), int(rng.integers(1, 5))
            w.add(f"img{i}", f"/x/{i}.png", f"s{i}", wd * 16, h * 16, rng.integers(0, tok.codebook_size, (h, wd, 4)))
    finalize_store(root / "store")
    return root, tok, CodeStore(root / "store")


def expected(tok, store):
    return {i: tok.embed([torch.from_numpy(store.get(i).codes)])[0] for i in store.ids()}


def test_shards_are_bounded_and_equal_the_direct_features(world, tmp_path):
    root, tok, store = world
    want = expected(tok, store)
    one_image = 64 * 4 * 2  # the tiny model's width is 64: shards of ~2 small images
    r = embed_store(store, tok, tmp_path / "f", max_shard_bytes=one_image, token_budget=4)
    shards = sorted((tmp_path / "f").glob("features-*.safetensors"))
    assert r["images"] == 9 and len(shards) >= 4
    for s in shards:  # no shard holds more than the bound plus the image that crossed it
        with safe_open(str(s), "pt") as f:
            sizes = [f.get_slice(k).get_shape()[0] * 64 * 4 for k in f.keys()]
        assert sum(sizes) - sizes[-1] < one_image or len(sizes) == 1
    got = read_features(tmp_path / "f")
    assert got.keys() == want.keys()
    for i, (t, grid) in got.items():
        assert torch.allclose(t, want[i].float(), atol=1e-5) and grid == (store.get(i).h, store.get(i).w)
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert index["images"] == 9 and set(index["ids"]) == set(want)


def test_bf16_and_single_file(world, tmp_path):
    root, tok, store = world
    want = expected(tok, store)
    r = embed_store(store, tok, tmp_path / "f.safetensors", dtype="bf16", max_shard_bytes=300)
    assert r["dtype"] == "bfloat16" and not (tmp_path / "f.safetensors.parts").exists()
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:  # a standard safetensors file
        assert set(f.keys()) == set(want)
        assert json.loads(f.metadata()["grids"])["img3"] == [store.get("img3").h, store.get("img3").w]
        for k in f.keys():
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and torch.allclose(t.float(), want[k], atol=2e-2, rtol=1e-2)
    again = embed_store(store, tok, tmp_path / "f.safetensors", dtype="bf16")
    assert again["resumed"] == 9


def test_resume_after_a_kill(world, tmp_path):
    root, tok, store = world

    class Kill(Exception):
        pass

    seen = []

    def die(n):
        seen.append(n)
        if sum(seen) >= 5:
            raise Kill

    with pytest.raises(Kill):
        embed_store(store, tok, tmp_path / "f", max_shard_bytes=1, token_budget=1, progress=die)
    before = sorted(p.name for p in (tmp_path / "f").glob("features-*"))
    assert len(before) >= 4 and not (tmp_path / "f" / "index.json").exists()
    r = embed_store(store, tok, tmp_path / "f", max_shard_bytes=1, token_budget=1)
    assert r["resumed"] == len(before) and len(read_features(tmp_path / "f")) == 9
    with pytest.raises(StoreError, match="dtype"):
        embed_store(store, tok, tmp_path / "f", dtype="bfloat16")
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        embed_store(store, tok, tmp_path / "g", dtype="int8")


def test_cli_embed_folder(world, tmp_path):
    root, tok, store = world
    p = subprocess.run([sys.executable, "-m", "viqctl", "embed", str(root / "store"), "--model", str(root / "m"),
                        "--out", str(tmp_path / "feats"), "--feature-dtype", "bfloat16", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["images"] == 9 and len(read_features(tmp_path / "feats")) == 9
