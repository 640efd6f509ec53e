"""The MLLM glue: projector, splicing at <image>, answer-only loss, LoRA/DoRA, data loading and sharding."""

import json

import pytest
import torch
import torch.nn.functional as F

from viq.data import WordTokenizer, load_samples, make_shapes_dataset, sample_texts
from viq.data.conversations import IGNORE_INDEX, Resize
from viq.errors import ConfigError
from viq.mllm import MLLM, BatchPlan, ConversationDataset, Projector, Skipped, build_llm, collate, placeholder_id
from viq.train.recipe.sections import LLMSection, LoraSection, TinyLLM


def tiny_llm(vocab=40, lora=False, trainable=True):
    section = LLMSection(tiny=TinyLLM(hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64),
                         max_length=128, trainable=trainable and not lora,
                         lora=LoraSection(enabled=lora, r=4, alpha=8, dropout=0.0, dora=True))
    return build_llm(section, vocab_size=vocab, seed=0)


@pytest.mark.parametrize("kind,pool,grid,n", [
    ("oryx_mlp_v2", "2x", (6, 4), 3 * 3 + 2), ("oryx_mlp_v2", "2x", (24, 24), 158),
    ("oryx_mlp_v2", "2x", (5, 3), 3 * 3 + 2), ("oryx_mlp_v2", "1x", (3, 2), 3 * 3 + 2),
    ("mlp", "2x", (6, 4), 6), ("mlp", "1x", (3, 5), 15)])
def test_projector_token_counts(kind, pool, grid, n):
    p = Projector(16, 8, kind, pool)
    out = p(torch.randn(grid[0] * grid[1], 16), grid)
    assert out.shape == (n, 8) and p.num_tokens(grid) == n  # odd grids are edge-padded, never crash


def test_projector_layout_has_newlines_and_brackets():
    p = Projector(16, 8, "oryx_mlp_v2", "2x")
    out = p(torch.randn(24, 16), (6, 4))  # pooled 3 x 2 -> rows of 2 tokens + newline
    assert torch.equal(out[0], p.image_begin) and torch.equal(out[-1], p.image_end)
    for row in range(3):
        assert torch.equal(out[1 + row * 3 + 2], p.image_newline)


def test_splice_puts_images_at_placeholders_and_masks_them():
    llm = tiny_llm()
    m = MLLM(llm, Projector(16, 32), max_length=64)
    ids = [[1, 2, 9, 3, 4, 5], [1, 9, 6, 9, 7]]
    labels = [[IGNORE_INDEX] * 4 + [4, 5], [IGNORE_INDEX] * 4 + [7]]
    pos = [[2], [1, 3]]
    imgs = [torch.randn(3, 32), torch.randn(2, 32), torch.randn(4, 32)]
    emb, mask, lab = m.splice(ids, labels, pos, imgs)
    table = llm.get_input_embeddings()
    assert emb.shape == (2, 9, 32) and mask[0].sum() == 8 and mask[1].sum() == 3 + 2 + 4
    assert torch.allclose(emb[0, 2:5], imgs[0]) and torch.allclose(emb[0, 5], table.weight[3])
    assert torch.allclose(emb[1, 1:3], imgs[1]) and torch.allclose(emb[1, 4:8], imgs[2])
    assert lab[0].tolist()[2:5] == [IGNORE_INDEX] * 3 and lab[0].tolist()[6:8] == [4, 5]
    assert (emb[0, 8:] == 0).all() and (lab[0, 8:] == IGNORE_INDEX).all() and mask[0, 8] == 0  # right padding


def test_loss_is_cross_entropy_on_answers_only():
    torch.manual_seed(0)
    llm = tiny_llm()
    m = MLLM(llm, Projector(16, 32))
    ids, labels, pos = [[1, 9, 3, 4, 5, 6]], [[IGNORE_INDEX] * 4 + [5, 6]], [[1]]
    img = [torch.randn(2, 32)]
    out = m(ids, labels, pos, img)
    emb, mask, lab = m.splice(ids, labels, pos, img)
    logits = llm(inputs_embeds=emb, attention_mask=mask).logits[0]
    # sequence: 1, img, img, 3, 4, 5, 6 -> answers 5 and 6 are predicted from positions 4 and 5
    expect = F.cross_entropy(logits[[4, 5]], torch.tensor([5, 6]))
    assert out.n_supervised == 2 and torch.allclose(out.loss, expect, atol=1e-5)
    assert out.n_tokens == 7


def test_lora_dora_trains_adapters_only():
    llm = tiny_llm(lora=True)
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("magnitude" in n for n in trainable)  # DoRA
    m = MLLM(llm, Projector(16, 32))
    out = m([[1, 9, 3, 4]], [[IGNORE_INDEX, IGNORE_INDEX, 3, 4]], [[1]], [torch.randn(2, 32, requires_grad=True)])
    out.loss.backward()
    assert all(p.grad is None for n, p in llm.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in llm.named_parameters() if "lora_B" in n
               or "magnitude" in n)


def test_generate_is_greedy_and_stops_at_eos():
    torch.manual_seed(0)
    m = MLLM(tiny_llm(), Projector(16, 32))
    img = [torch.randn(2, 32)]
    out = m.generate([1, 9, 3], [1], img, max_new_tokens=5)
    assert len(out) == 5
    stop = m.generate([1, 9, 3], [1], img, max_new_tokens=5, eos_id=out[0])
    assert stop == []


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ds = make_shapes_dataset(root, n_train=12, n_val=2, seed=1)
    lines = ds.train.read_text().splitlines()
    broken = json.loads(lines[3])
    (root / broken["image"][0]["img_path"]).write_bytes(b"not a png")  # unreadable at load time
    bad = json.loads(lines[5])
    bad["conversations"][0]["value"] = "no image token"  # caught when the file is read
    lines[5] = json.dumps(bad)
    ds.train.write_text("\n".join(lines) + "\n")
    return ds


def test_bad_samples_are_reported_and_skipped_never_replaced(shapes):
    samples = load_samples(shapes.train)
    assert [b.index for b in samples.bad] == [5] and "image" in samples.bad[0].reason
    tok = WordTokenizer.from_texts(sample_texts(samples))
    ds = ConversationDataset(samples.samples, tok, "plain", Resize(96, 32), 256, projector_tokens=Projector(8, 8).num_tokens,
                             image_token_id=placeholder_id(tok))
    items = [ds[i] for i in range(len(ds))]
    skipped = [it for it in items if isinstance(it, Skipped)]
    assert [s.index for s in skipped] == [3] and "sample 3" in str(skipped[0])
    batch = collate(items[:5])
    assert batch.indices == [0, 1, 2, 4] and [s.index for s in batch.skipped] == [3]
    assert len(batch.images) == 4 and batch.image_keys[0] == ("train", 0, 0)
    assert all(t.shape[1] % 32 == 0 and t.shape[2] % 32 == 0 for t in batch.images)  # "96x32" resize


def test_too_long_image_spans_are_skipped(shapes):
    samples = load_samples(shapes.val)
    tok = WordTokenizer.from_texts(sample_texts(samples))
    ds = ConversationDataset(samples.samples, tok, "plain", Resize(96, 32), 8, projector_tokens=Projector(8, 8).num_tokens,
                             image_token_id=placeholder_id(tok))
    item = ds[0]
    assert isinstance(item, Skipped) and "max_length" in item.reason


def test_batch_plan_shards_are_disjoint_and_equal():
    plans = [BatchPlan(23, 3, world=2, rank=r, seed=5) for r in range(2)]
    for epoch in range(3):
        a, b = (p.epoch(epoch) for p in plans)
        assert len(a) == len(b) == 3
        fa, fb = {i for x in a for i in x}, {i for x in b for i in x}
        assert not fa & fb
    assert plans[0].epoch(0) != plans[0].epoch(1)  # a new permutation every epoch
    assert BatchPlan(23, 3, seed=5).epoch(2) == BatchPlan(23, 3, seed=5).epoch(2)
    budget = BatchPlan(6, 1, token_counts=[10, 10, 30, 5, 5, 5], max_tokens=20, shuffle=False)
    assert budget.epoch(0) == [[0, 1], [2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="micro-batch"):
        BatchPlan(3, 2, world=2)
