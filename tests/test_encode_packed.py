"""Packed encoding does per batch what it did per image, with the very same values; the CPU encode
keeps freed activations out of resident memory where the C library allows it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import viq.encode
import viq.heap
from viq.config import tiny_config
from viq.encode import EncodeOptions, encode_to_store
from viq.model.viq_model import ViQModel
from viq.nn.attention import Segments, _sdpa, packed_attention
from viq.nn.vit import PatchEmbed
from viq.sources import collect_sources
from viq.tokenizer import ViQTokenizer

SIZES = [(32, 48), (96, 64), (80, 80), (48, 96), (33, 70), (32, 48), (16, 16), (47, 47)]  # (H, W)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in SIZES]


def test_one_convolution_over_all_patches_equals_one_per_padded_image():
    torch.manual_seed(0)
    embed = PatchEmbed(16, 96)
    images = _images()
    with torch.inference_mode():
        packed, grids = embed.embed_many(images)
        per_image = []
        for img in images:  # what the reference does: pad the image, convolve it whole
            _, hgt, wid = img.shape
            padded = F.pad(img, (0, -wid % 16, 0, -hgt % 16))
            per_image.append(embed.proj(padded[None]).flatten(2)[0].T)
    assert grids == [(-(-h // 16), -(-w // 16)) for h, w in SIZES]
    assert torch.equal(packed, torch.cat(per_image))


def test_vit_embedding_equals_per_image_embedding_with_its_own_positions():
    torch.manual_seed(0)
    vit = ViQModel(tiny_config(), parts=("encoder",)).vit.eval()
    torch.nn.init.normal_(vit.pos_embed)
    images = _images(1)
    with torch.inference_mode():
        packed, packing = vit.embed(images)
        one_by_one = [vit.embed([img])[0] for img in images]
    assert torch.equal(packed, torch.cat(one_by_one))
    assert packing.segments.lengths == tuple(x.shape[0] for x in one_by_one)


@pytest.mark.parametrize("lengths", [(4, 20, 4, 36, 20, 20, 7), (12,) * 5, (5, 6, 7), (9,)])
def test_equal_length_images_share_one_attention_call_with_the_same_values(lengths):
    g = torch.Generator().manual_seed(0)
    t, heads, dim = sum(lengths), 3, 16
    qkv = torch.randn(t, 3, heads, dim, generator=g)
    q, k, v = qkv.unbind(1)  # strided, as the model's qkv projection gives them
    with torch.inference_mode():
        got = packed_attention(q, k, v, Segments(lengths), 0.25, backend="loop")
        start, want = 0, []
        for n in lengths:
            want.append(_sdpa(q[start:start + n], k[start:start + n], v[start:start + n], 0.25))
            start += n
    assert torch.equal(got, torch.cat(want))


def test_bound_heap_is_applied_on_glibc_and_skipped_elsewhere(monkeypatch):
    import platform
    import sys

    viq.heap._glibc.cache_clear()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert viq.heap.bound_heap() is True
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    viq.heap._glibc.cache_clear()
    try:
        assert viq.heap.bound_heap() is False
    finally:
        monkeypatch.undo()
        viq.heap._glibc.cache_clear()


def test_cpu_encode_bounds_the_heap(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(viq.encode, "bound_heap", lambda *a, **k: calls.append(a) or True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24 + 8 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    cfg = tiny_config()
    tok = ViQTokenizer(ViQModel(cfg, parts=("encoder",)).eval().requires_grad_(False), cfg)
    summary = encode_to_store(collect_sources([str(folder)]), tok, tmp_path / "store", {}, EncodeOptions(workers=1))
    assert summary.encoded == 3 and len(calls) == 1


def test_stage_labels_are_recorded_under_a_profiler_and_skipped_otherwise(tmp_path):
    """benchmarks/encode_folder.py reads its breakdown from these labels; unprofiled runs skip them."""
    from torch.profiler import ProfilerActivity, profile

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (24, 16 + 8 * i), (10 * i, 50, 90)).save(folder / f"{i}.png")
    cfg = tiny_config()
    tok = ViQTokenizer(ViQModel(cfg, parts=("encoder",)).eval().requires_grad_(False), cfg)
    assert viq.encode._labeller() is viq.encode._no_label
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert viq.encode._labeller() is not viq.encode._no_label
        encode_to_store(collect_sources([str(folder)]), tok, tmp_path / "store", {}, EncodeOptions())
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("viq.")}
    assert counts == {"viq.read": 2, "viq.sha256": 2, "viq.decode_resize": 2, "viq.model": 1, "viq.store": 2}


def test_grouped_attention_also_trains_after_an_inference_call():
    lengths = Segments((6, 6, 3))
    q = torch.randn(15, 2, 8)
    with torch.inference_mode():
        packed_attention(q, q, q, lengths, 0.3, backend="loop")  # caches the grouping
    x = q.clone().requires_grad_(True)
    packed_attention(x, x, x, lengths, 0.3, backend="loop").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_decode_threads_default_to_none_on_cpu_and_an_explicit_count_is_kept():
    from viq.encode import resolve_workers

    cfg = tiny_config()
    tok = ViQTokenizer(ViQModel(cfg, parts=("encoder",)).eval(), cfg)
    assert resolve_workers(EncodeOptions(), tok) == 0  # measured: threads take the cores from the model
    assert resolve_workers(EncodeOptions(workers=3), tok) == 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_orientation_is_still_applied_when_the_file_carries_one(tmp_path, fmt):
    from viq.images import _may_have_orientation, load_rgb

    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    plain, rotated = tmp_path / f"plain.{fmt.lower()}", tmp_path / f"rot.{fmt.lower()}"
    Image.fromarray(arr).save(plain, fmt)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(rotated, fmt, exif=exif.tobytes())
    assert load_rgb(plain).size == (16, 8)
    assert load_rgb(rotated).size == (8, 16)  # upright: the EXIF orientation was applied
    if fmt == "JPEG":  # the fast path: nothing to read an orientation from
        with Image.open(plain) as im:
            im.load()
            assert not _may_have_orientation(im)


def test_reading_a_file_returns_it_whole_and_refuses_one_over_the_cap(tmp_path):
    from viq.errors import ImageError
    from viq.sources.base import read_file

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 10)
    assert read_file(path, 2560) == bytes(range(256)) * 10
    with pytest.raises(ImageError, match="exceeds the limit"):
        read_file(path, 2559)
    path.write_bytes(b"")
    assert read_file(path, 10) == b""


def test_patch_embedding_takes_non_contiguous_images_of_exact_patch_multiples():
    torch.manual_seed(0)
    embed = PatchEmbed(16, 32)
    img = torch.rand(32, 48, 3).permute(2, 0, 1)  # (3, 32, 48) channels-last view, no padding needed
    with torch.inference_mode():
        got, grid = embed(img)
        want = embed.proj(img.contiguous()[None]).flatten(2)[0].T
    assert grid == (2, 3) and torch.equal(got, want)
