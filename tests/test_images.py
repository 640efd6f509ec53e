"""viq.images: safe decoding to RGB, the resize policies, and the pixel formula."""

import os
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from viq.errors import ConfigError, ImageError
from viq.images import (CenterCrop, ImageInfo, Native, NoResize, Preprocessor, load_rgb,
                        parse_policy, prepare, to_pixels)

EXAMPLES = Path(__file__).resolve().parents[1] / "viq" / "assets" / "examples"


def save(im, path, fmt=None, **kw):
    im.save(path, fmt, **kw)
    return path


def px(im, xy):
    return im.getpixel(xy)


def close(a, b, tol=6):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ---- conversions -------------------------------------------------------------------------------


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(im, tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    assert close(px(out, (17, 2)), (255, 0, 0))  # top-left went to the top-right
    assert close(px(out, (2, 2)), (0, 0, 255))


def test_grey_and_one_bit(tmp_path):
    out = load_rgb(save(Image.new("L", (5, 4), 77), tmp_path / "g.png"))
    assert out.mode == "RGB" and px(out, (0, 0)) == (77, 77, 77)
    bw = Image.new("1", (8, 2), 0)
    bw.putpixel((3, 1), 1)
    out = load_rgb(save(bw, tmp_path / "bw.png"))
    assert px(out, (3, 1)) == (255, 255, 255) and px(out, (0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_goes_over_white(tmp_path, fmt):
    im = Image.new("P", (6, 6), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    im.paste(1, (0, 0, 3, 6))
    path = save(im, tmp_path / f"p.{fmt.lower()}", fmt, transparency=0)
    out = load_rgb(path)
    assert px(out, (0, 0)) == (255, 0, 0) and px(out, (5, 5)) == (255, 255, 255)


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    assert px(load_rgb(save(im, tmp_path / "p.png")), (1, 1)) == (10, 200, 30)


def test_alpha_is_composited_over_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    out = load_rgb(save(im, tmp_path / "a.png"))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (255, 0, 0)
    assert close(px(out, (2, 0)), (127, 127, 127), 1)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (50, 255)])
    out = load_rgb(save(la, tmp_path / "la.png"))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (50, 50, 50)


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(tmp_path, fmt):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_rgb(save(im, tmp_path / f"c.{fmt.lower()}", fmt))
    assert close(px(out, (4, 4)), (255, 0, 0))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535, 1000]], dtype=np.uint16)
    expect = [0, 1, 128, 255, 4]  # round(v * 255 / 65535)
    png = save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(png).mode.startswith("I;16")
    assert np.asarray(load_rgb(png))[0, :, 0].tolist() == expect
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    assert np.asarray(load_rgb(save(big_endian, tmp_path / "g16b.tif")))[0, :, 1].tolist() == expect


def test_int32_and_float_modes(tmp_path):
    i32 = Image.fromarray(np.array([[0, 65535, 257]], dtype=np.int32))
    assert np.asarray(load_rgb(save(i32, tmp_path / "i.tif")))[0, :, 0].tolist() == [0, 255, 1]
    neg = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert np.asarray(load_rgb(save(neg, tmp_path / "n.tif")))[0, :, 0].tolist() == [0, 128, 255]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb(save(f01, tmp_path / "f.tif")))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 1.0, 3.0, np.nan]], dtype=np.float32))
    assert np.asarray(load_rgb(save(wide, tmp_path / "w.tif")))[0, :, 0].tolist() == [0, 128, 255, 64]


def test_bytes_input_and_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = load_rgb(buf.getvalue(), name="anim.gif")
    assert out.size == (4, 4) and close(px(out, (0, 0)), (255, 0, 0))


# ---- bad inputs ----------------------------------------------------------------------------------


def rgb_noise(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def expect_error(source, *words, **kw):
    with pytest.raises(ImageError) as e:
        load_rgb(source, **kw)
    msg = str(e.value)
    assert str(source) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_empty_missing_directory_and_not_an_image(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    expect_error(tmp_path / "empty.jpg", "empty")
    expect_error(tmp_path / "nope.jpg", "no such file")
    expect_error(tmp_path, "directory")
    (tmp_path / "notes.png").write_text("hello, I am text")
    expect_error(tmp_path / "notes.png", "not an image")


def test_permission_denied(tmp_path, monkeypatch):
    path = save(rgb_noise(), tmp_path / "locked.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("viq.sources.base.os.open", refuse)  # the one opener of image files
    expect_error(path, "permission")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_files(tmp_path, fmt):
    data = io.BytesIO()
    rgb_noise().save(data, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    expect_error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_from_a_parameter(tmp_path):
    path = save(rgb_noise(20, 20), tmp_path / "ok.png")
    expect_error(path, "decompression bomb", max_pixels=399)
    assert load_rgb(path, max_pixels=400).size == (20, 20)


def png_header_only(w, h):
    """A PNG whose header claims w x h but holds almost no data: only the header is cheap to read."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize("w,h,limit", [(5000, 5000, 10_000_000), (20000, 20000, None), (100000, 50000, None)])
def test_large_header_is_refused_before_decoding(tmp_path, w, h, limit):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(w, h))
    kw = {} if limit is None else {"max_pixels": limit}
    expect_error(path, "decompression bomb", **kw)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the broken TIFF tags
def test_corrupted_bytes_only_ever_raise_image_error():
    rng = np.random.default_rng(1)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        buf = io.BytesIO()
        rgb_noise(24, 16).save(buf, fmt)
        good = bytearray(buf.getvalue())
        for _ in range(15):
            bad = bytearray(good)
            for pos in rng.integers(0, len(bad), 4):
                bad[pos] = int(rng.integers(0, 256))
            try:
                assert load_rgb(bytes(bad)).mode == "RGB"
            except ImageError as e:
                assert "<bytes>" in str(e)


def test_fixture_images_decode_to_their_pixels(fixtures_dir):
    data = np.load(fixtures_dir / "results_16k" / "case_native.npz")
    for i, name in enumerate(["native_0_A_64x96.png", "native_1_B_128x80.png", "native_2_C_100x72.png"]):
        np.testing.assert_array_equal(np.asarray(load_rgb(fixtures_dir / "images" / name)),
                                      data[f"input_rgb_{i}"])


# ---- pixels --------------------------------------------------------------------------------------


def test_to_pixels_is_exact_for_every_value():
    values = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([values, values[::-1], values], -1)[None])
    t = to_pixels(img)
    assert str(t.dtype) == "torch.float32" and t.shape == (3, 1, 256)
    formula = values.astype(np.float32) / np.float32(127.5) - np.float32(1)
    # the reference's processor: uint8 -> float64 * (1/255) -> float32, then (x - 0.5) / 0.5
    processor = ((values.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(t[0, 0].numpy(), formula)
    np.testing.assert_array_equal(formula, processor)
    np.testing.assert_array_equal(t[1, 0].numpy(), formula[::-1])
    with pytest.raises(ConfigError):
        to_pixels(Image.new("L", (2, 2)))


# ---- policies ------------------------------------------------------------------------------------


def reference_process_image(img, t):
    """The reference's resize_and_center_crop, step by step."""
    width, height = img.size
    if width < height:
        new_w, new_h = t, int(t / width * height)
    else:
        new_h, new_w = t, int(t / height * width)
    img = img.resize((new_w, new_h))  # PIL's default filter for RGB
    left, top = (new_w - t) / 2, (new_h - t) / 2
    return img.crop((left, top, (new_w + t) / 2, (new_h + t) / 2))


@pytest.mark.parametrize("w,h,t", [(64, 96, 48), (128, 80, 96), (101, 67, 64), (67, 101, 63),
                                   (40, 30, 57), (31, 50, 96), (50, 50, 33), (320, 241, 224)])
def test_center_crop_matches_the_reference(w, h, t):
    img = rgb_noise(w, h, seed=w * h)
    ours = CenterCrop(t).apply(img)
    ref = reference_process_image(img, t)
    assert ours.size == ref.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def brute_force_native(w, h, m, p):
    s = math.sqrt(m / (w * h))
    return max(p, int(w * s // p) * p), max(p, int(h * s // p) * p)


@pytest.mark.parametrize("w,h", [(4032, 3024), (1025, 1024), (1024, 1025), (3000, 2000), (1999, 3001),
                                 (7680, 4320), (12345, 6789), (2048, 2048), (1100, 1000)])
def test_native_floors_each_side_to_the_patch(w, h):
    pol = Native()
    nw, nh = pol.target_size(w, h)
    assert nw * nh <= pol.max_pixels and nw % 16 == 0 and nh % 16 == 0
    assert (nw, nh) == brute_force_native(w, h, pol.max_pixels, 16)
    assert abs(nw / nh - w / h) / (w / h) < 0.03  # aspect ratio kept within the rounding


@pytest.mark.parametrize("w,h,m,p", [(200000, 10, 1 << 20, 16), (10, 300000, 1 << 20, 16),
                                     (50000, 20, 4096, 16), (3, 100000, 262144, 14),
                                     (1_000_000, 1_000_000, 1 << 20, 16), (17, 17, 256, 16)])
def test_native_budget_holds_for_extreme_shapes(w, h, m, p):
    nw, nh = Native(max_pixels=m, patch=p).target_size(w, h)
    assert nw * nh <= m and nw >= p and nh >= p and nw % p == 0 and nh % p == 0


def test_native_leaves_small_images_alone_and_resizes_big_ones():
    small = rgb_noise(100, 60)
    assert Native(max_pixels=6000).apply(small) is small
    out = Native(max_pixels=4096).apply(small)
    assert out.size == (80, 48) and out.mode == "RGB"
    assert NoResize().apply(small) is small


def test_policy_strings_round_trip_and_reject_nonsense():
    for text, pol in [("native", Native()), ("native:262144", Native(262144)),
                      ("native:max_pixels=1048576", Native()), ("Native:max_pixels=4096,patch=14", Native(4096, 14)),
                      ("center-crop:384", CenterCrop(384)), ("none", NoResize())]:
        assert parse_policy(text) == pol
        assert parse_policy(pol.describe()) == pol
    assert Native().describe() == "native:max_pixels=1048576"
    assert CenterCrop(1024).describe() == "center-crop:1024" and NoResize().describe() == "none"
    for bad in ["", "foo", "center-crop", "center-crop:abc", "center-crop:0", "native:0", "native:-5",
                "native:max_pixels=100", "native:foo=3", "native:max_pixels", "none:3"]:
        with pytest.raises(ConfigError):
            parse_policy(bad)


def test_prepare_reports_what_it_did(tmp_path):
    path = save(rgb_noise(300, 200), tmp_path / "x.png")
    pixels, info = prepare(path, "native:max_pixels=16384")
    assert pixels.shape == (3, 96, 144)
    assert info == ImageInfo(str(path), (300, 200), (144, 96), "native:max_pixels=16384")
    pixels, info = Preprocessor(CenterCrop(64)).prepare(path)
    assert pixels.shape == (3, 64, 64) and info.policy == "center-crop:64"
    with pytest.raises(ImageError):
        prepare(path, NoResize(), max_input_pixels=100)


def test_shipped_examples_are_small_licensed_photos():
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    assert len(files) >= 2
    licenses = (EXAMPLES / "LICENSES.md").read_text()
    sizes = set()
    for f in files:
        assert f.stat().st_size < 60_000 and f.name in licenses
        sizes.add(load_rgb(f).size)
    assert len(sizes) == len(files)


def test_a_fifo_path_fails_at_once_instead_of_blocking(tmp_path):
    """load_rgb shares encode's opener: a FIFO named like an image is refused, not read (which would hang)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    expect_error(fifo, "not a regular file")
