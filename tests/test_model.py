"""Packing: several images in one sequence give exactly what each image alone gives."""

import torch

from viq.config import tiny_config
from viq.model.viq_model import ViQModel
from viq.packing import batches_by_budget


def make_model(size="16k"):
    torch.manual_seed(0)
    model = ViQModel(tiny_config(size)).eval()
    return model


def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in [(48, 64), (33, 100), (16, 16), (80, 40)]]


@torch.no_grad()
def test_packed_equals_one_by_one():
    model = make_model()
    ims = images()
    idx, packing = model.encode(ims)
    assert packing.grids == ((3, 4), (3, 7), (1, 1), (5, 3))
    feats = model.embed(idx)
    lat = model.draw_latents(feats, packing)
    for i, im in enumerate(ims):
        one, p1 = model.encode([im])
        assert torch.equal(one, packing.split(idx, 4)[i])
        f1 = model.embed(one)
        torch.testing.assert_close(f1, packing.split(feats)[i], rtol=1e-5, atol=1e-5)
        l1 = model.draw_latents(f1, p1)[0]
        torch.testing.assert_close(l1, lat[i], rtol=1e-5, atol=1e-5)
        assert l1.shape == (1, 16, 2 * p1.grids[0][0], 2 * p1.grids[0][1])


@torch.no_grad()
def test_reconstruction_is_uint8_of_padded_size():
    model = make_model()
    idx, packing = model.encode([images()[1]])
    img = model.decode_latent(model.draw_latents(model.embed(idx), packing)[0])
    assert img.dtype == torch.uint8 and img.shape == (48, 112, 3)


def test_batches_by_budget_keeps_order_and_budget():
    counts = [10, 50, 30, 200, 5, 5]
    b = batches_by_budget(counts, 64)
    assert [i for g in b for i in g] == list(range(6))
    for g in b:
        assert sum(counts[i] for i in g) <= 64 or len(g) == 1


def test_head_tables_follow_the_build_device_but_not_meta(monkeypatch):
    """A model built under ``torch.device(d)`` keeps its computed tables (RoPE, code table) on d, so a
    CUDA build is whole on CUDA; under meta (a load) they stay real CPU tensors, equal to a CPU build's."""
    import viq.model.head as head

    with torch.device("meta"):
        meta_model = ViQModel(tiny_config(), parts=("encoder", "decoder"))
    cpu_model = ViQModel(tiny_config(), parts=("encoder", "decoder"))
    for name in ("rope_freqs", "codebook"):
        table = getattr(meta_model.head, name)
        assert table.device.type == "cpu" and torch.equal(table, getattr(cpu_model.head, name))
    monkeypatch.setattr(head.torch, "get_default_device", lambda: torch.device("cuda", 0))
    assert head._home() == torch.device("cuda", 0)  # what a CUDA context gives
    monkeypatch.undo()
    monkeypatch.setattr(head, "_home", lambda: torch.device("meta"))  # a device this CPU build is not on
    other = ViQModel(tiny_config(), parts=("encoder", "decoder"))
    assert other.head.rope_freqs.is_meta and other.head.codebook.is_meta  # the tables went where _home says
