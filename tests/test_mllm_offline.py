"""The offline MLLM path: code-store lookups, packing, labels, and packed == one-by-one."""

import hashlib
import json

import numpy as np
import pytest
import torch

from viq.config import tiny_config
from viq.data.conversations import IGNORE_INDEX, Turn, WordTokenizer, encode_conversation, load_samples
from viq.errors import StoreError
from viq.mllm.collate import Skipped
from viq.mllm.model import Projector
from viq.mllm.offline import (OfflineConversationDataset, OfflineImageEncoder, OfflineItem, OnlineImageEncoder,
                              PackedMLLM, check_store_levels, collate_packed, expanded_length, pack_items,
                              packed_batches)
from viq.mllm.varlen_attention import length_buckets, register_varlen_sdpa, varlen_sdpa_attention
from viq.model.viq_model import ViQModel
from viq.store import CodeStoreWriter, finalize_store

CFG = tiny_config("16k")  # ViT width 64, codebook 15360
LEVELS = CFG.head.levels


def tokens(grid):  # the oryx projector's count, without building one
    return Projector(4, 4).num_tokens(grid)


def write_store(root, grids, seed=0):
    """A real code store with one row per (id -> grid); returns the codes written."""
    rng = np.random.default_rng(seed)
    info = {"name": "test", "fingerprint": "f" * 8, "levels": LEVELS, "codebook_size": int(np.prod(LEVELS))}
    written = {}
    with CodeStoreWriter(root, info, preprocess="native") as w:
        for key, (h, wd) in grids.items():
            codes = rng.integers(0, int(np.prod(LEVELS)), (h, wd, 4))
            w.add(key, key, hashlib.sha256(key.encode()).hexdigest(), wd * 16, h * 16, codes)
            written[key] = codes
    finalize_store(root)
    return written


def sample(sid, images, prompt, answer):
    return {"id": sid, "image": [{"img_path": p} for p in images],
            "conversations": [{"from": "human", "value": "<image>\n" * len(images) + prompt},
                              {"from": "gpt", "value": answer}]}


@pytest.fixture
def data(tmp_path):
    written = write_store(tmp_path / "codes", {"a.png": (4, 6), "dir/b.png": (2, 2), "c.png": (6, 4)})
    records = [sample("s0", ["a.png"], "what is this", "a red square on grey"),
               sample("s1", ["./dir/b.png", "c.png"], "compare them", "the first is smaller"),
               sample("s2", ["missing.png"], "and this", "nothing"),
               sample("s3", [], "no image here", "fine")]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    texts = [t["value"] for r in records for t in r["conversations"]]
    tok = WordTokenizer.from_texts(texts)
    samples = load_samples(path, check_files=False)
    assert not samples.bad
    return OfflineConversationDataset(samples.samples, tmp_path / "codes", tok, "plain"), written, tok


def test_dataset_reads_codes_by_id(data):
    ds, written, tok = data
    it = ds[0]
    assert isinstance(it, OfflineItem) and it.image_keys == ["a.png"]
    assert it.grids == [(4, 6)]
    assert torch.equal(it.codes[0], torch.from_numpy(written["a.png"]))
    it = ds[1]  # "./dir/b.png" is found as "dir/b.png"
    assert it.image_keys == ["dir/b.png", "c.png"] and it.grids == [(2, 2), (6, 4)]
    assert len(it.image_positions) == 2 and all(it.input_ids[p] == tok.image_token_id for p in it.image_positions)
    assert isinstance(ds[3], OfflineItem) and ds[3].codes == []


def test_missing_id_is_reported_clearly(data):
    ds = data[0]
    skipped = ds[2]
    assert isinstance(skipped, Skipped) and "missing.png" in skipped.reason and "code store" in skipped.reason
    assert ds.check(strict=False) == [(2, "s2", "missing.png")]
    with pytest.raises(StoreError, match="missing.png.*viqctl encode"):
        ds.check()


def test_missing_store_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="no such code store"):
        OfflineConversationDataset([], tmp_path / "nope", WordTokenizer.from_texts([]))


@pytest.mark.parametrize("length", [40, 64, 97])
def test_packing_makes_rows_of_exactly_the_length(data, length):
    ds, _, tok = data
    items = [ds[i] for i in range(len(ds))]
    rows, skipped = pack_items(items, length, tokens, pad_id=tok.pad_id)
    kept = [it for it in items if isinstance(it, OfflineItem) and expanded_length(it, tokens) <= length]
    too_long = [it.index for it in items if isinstance(it, OfflineItem) and it not in kept]
    assert sorted(s.index for s in skipped) == sorted([2] + too_long)  # the missing id, and any too long
    assert sum(len(r.samples) for r in rows) == len(kept)
    for r in rows:
        assert r.length == length == len(r.labels) == len(r.position_ids)
        # padding only at the end, unsupervised, its own segment
        if r.n_pad:
            assert r.input_ids[-r.n_pad:] == [tok.pad_id] * r.n_pad
            assert r.labels[-r.n_pad:] == [IGNORE_INDEX] * r.n_pad
            assert r.position_ids[-r.n_pad:] == list(range(r.n_pad))
        assert sum(r.segment_lengths()) == length
        assert r.segment_lengths()[:len(r.samples)] == [expanded_length(items[i], tokens) for _, i, _ in r.samples]
        assert [n for _, n in r.image_spans] == [tokens(g) for g in r.grids]
        assert len(r.images) == len(r.grids) == len(r.image_keys)
        for s, n in r.image_spans:  # image spans carry no loss
            assert all(v == IGNORE_INDEX for v in r.labels[s:s + n])


def test_too_long_sample_is_skipped_not_cut(data):
    ds, _, tok = data
    it = ds[1]
    n = expanded_length(it, tokens)
    rows, skipped = pack_items([it], n - 1, tokens)
    assert rows == [] and len(skipped) == 1 and f"{n} positions" in skipped[0].reason
    rows, skipped = pack_items([it], n, tokens)
    assert len(rows) == 1 and rows[0].n_pad == 0 and not skipped


def test_labels_only_on_answers():
    tok = WordTokenizer.from_texts(["look at it", "a blue circle"])
    enc = encode_conversation([Turn("human", "<image>\nlook at it"), Turn("gpt", "a blue circle")], tok, "plain")
    item = OfflineItem(0, "x", ["k"], [torch.zeros(2, 2, 4, dtype=torch.long)], enc.input_ids, enc.labels,
                       enc.image_positions)
    (row,), _ = pack_items([item, item], 2 * expanded_length(item, tokens) + 3, tokens)
    supervised = [v for v in row.labels if v != IGNORE_INDEX]
    assert tok.decode(supervised) == "a blue circle <eos> a blue circle <eos>"
    assert row.n_supervised == 2 * 4 and row.n_pad == 3


def _tiny_llm(vocab, seed=0, attn="sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False,
                      initializer_range=0.3)  # peaky attention: leaks between samples would show
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


def _offline_model(vocab, attn="sdpa"):
    torch.manual_seed(1)
    emb = ViQModel(CFG, parts=("decoder",))
    return PackedMLLM(_tiny_llm(vocab, attn=attn), OfflineImageEncoder(emb, Projector(CFG.vit.width, 32))).eval()


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_loss_equals_samples_one_by_one(data, attn):
    ds, _, tok = data
    items = [ds[0], ds[1], ds[3]]
    model = _offline_model(len(tok), register_varlen_sdpa() if attn == "varlen" else attn)
    rows, _ = pack_items(items, 200, model.image_encoder.projector.num_tokens, pad_id=tok.pad_id)
    assert len(rows) == 1 and len(rows[0].samples) == 3 and rows[0].n_pad > 0
    with torch.no_grad():
        packed = model(collate_packed(rows))
        total, n = 0.0, 0
        for it in items:
            (r,), _ = pack_items([it], expanded_length(it, tokens), tokens, pad_id=tok.pad_id)
            o = model(collate_packed([r]))
            total += float(o.loss) * o.n_supervised
            n += o.n_supervised
    assert packed.n_supervised == n
    assert float(packed.loss) == pytest.approx(total / n, rel=1e-5)


def test_two_rows_are_one_varlen_sequence(data):
    ds, _, tok = data
    n = max(expanded_length(ds[0], tokens), expanded_length(ds[1], tokens))
    rows, _ = pack_items([ds[0], ds[1]], n, tokens, pad_id=tok.pad_id)
    assert len(rows) == 2
    b = collate_packed(rows)
    assert b.input_ids.shape == (1, 2 * n) and b.rows == 2
    assert b.segments == rows[0].segment_lengths() + rows[1].segment_lengths()
    assert int(b.image_mask.sum()) == sum(r.n_image_tokens for r in rows)


def test_online_and_offline_see_the_same_sequence(data):
    ds, _, tok = data
    rows, _ = pack_items([ds[0], ds[1]], 120, tokens, pad_id=tok.pad_id)
    torch.manual_seed(0)
    pixels = [torch.rand(3, 16 * h, 16 * w) * 2 - 1 for r in rows for h, w in r.grids]
    off_b, on_b = collate_packed(rows), collate_packed(rows, images=pixels)
    for name in ("input_ids", "labels", "position_ids", "image_mask"):
        assert torch.equal(getattr(off_b, name), getattr(on_b, name))
    torch.manual_seed(1)
    model = ViQModel(CFG, parts=("encoder", "decoder"))
    projector = Projector(CFG.vit.width, 32)
    llm = _tiny_llm(len(tok))
    off = PackedMLLM(llm, OfflineImageEncoder(model, projector))
    on = PackedMLLM(llm, OnlineImageEncoder(model.vit, projector))
    with torch.no_grad():
        e_off, e_on = off.embed(off_b), on.embed(on_b)
        assert e_off.shape == e_on.shape
        text = ~off_b.image_mask[0]
        assert torch.equal(e_off[0, text], e_on[0, text])  # identical text tokens
        assert not torch.equal(e_off[0, ~text], e_on[0, ~text])  # images came from different sources
        assert off(off_b).n_supervised == on(on_b).n_supervised


def test_frozen_parts_get_no_gradient(data):
    ds, _, tok = data
    rows, _ = pack_items([ds[0], ds[1]], 120, tokens, pad_id=tok.pad_id)
    torch.manual_seed(1)
    model = ViQModel(CFG, parts=("encoder", "decoder"))
    projector = Projector(CFG.vit.width, 32)
    llm = _tiny_llm(len(tok)).train()
    pixels = [torch.rand(3, 16 * h, 16 * w) for r in rows for h, w in r.grids]
    for m, b in ((PackedMLLM(llm, OfflineImageEncoder(model, projector)), collate_packed(rows)),
                 (PackedMLLM(llm, OnlineImageEncoder(model.vit, projector)), collate_packed(rows, images=pixels))):
        m.train()
        m(b).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert projector.proj1.weight.grad is not None and llm.model.layers[0].mlp.up_proj.weight.grad is not None
        m.zero_grad(set_to_none=True)


def test_packed_batches_stream_the_data_set(data):
    ds, _, tok = data
    n = max(expanded_length(ds[i], tokens) for i in (0, 1, 3))
    out = list(packed_batches(ds, [0, 1, 2, 3], n, tokens, pad_id=tok.pad_id, rows=2))
    assert [b.rows for b, _ in out] == [2, 1]
    assert all(b.n_tokens == b.rows * n for b, _ in out)
    assert [s.index for _, sk in out for s in sk] == [2]  # the missing image, reported once
    assert sum(int(b.image_mask.sum()) for b, _ in out) == sum(tokens(g) for i in (0, 1) for g in ds[i].grids)


def test_store_levels_must_match_the_embedder(data):
    ds = data[0]
    check_store_levels(ds.store, LEVELS)
    with pytest.raises(StoreError, match=r"\[8, 8, 8, 5, 5, 5\]"):
        check_store_levels(ds.store, [8, 8, 8, 5, 5, 5])


def test_length_buckets_keep_similar_lengths_together():
    groups = length_buckets([100, 3, 60, 0, 51, 200, 7, 4])
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 4, 5, 6, 7]  # empty samples dropped
    lengths = [100, 3, 60, 0, 51, 200, 7, 4]
    for g in groups:
        assert max(lengths[i] for i in g) <= 2 * min(lengths[i] for i in g)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[100, 200], [51, 60], [4, 7], [3]]


@pytest.mark.parametrize("segments", [[5, 9, 2, 16, 1, 7], [32], [3, 3, 3], [1, 40, 2]])
def test_varlen_sdpa_equals_attention_sample_by_sample(segments):
    """The padded, bucketed call gives what causal SDPA gives on each sample alone (values and gradients)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    torch.manual_seed(0)
    L, H, Hkv, D = sum(segments), 4, 2, 8
    q = torch.randn(1, H, L, D, requires_grad=True)
    k, v = (torch.randn(1, Hkv, L, D, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    got, _ = varlen_sdpa_attention(SimpleNamespace(training=False), q, k, v, cu_seq_lens_q=cu, scaling=0.3)
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], kk[:, :, a:b], vv[:, :, a:b], is_causal=True,
                                                     scale=0.3) for a, b in zip(cu[:-1], cu[1:])], 2).transpose(1, 2)
    assert got.shape == (1, L, H, D) and torch.allclose(got, want, atol=1e-6)
    g1 = torch.autograd.grad(got.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
