"""Input enumeration never hangs and reads only what it should: FIFOs, devices, symlink loops,
size caps; folders take every format Pillow opens; URLs are refused with a pointer."""

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from viq.errors import ConfigError, ImageError
from viq.sources import Source, SourceReader, collect_sources, image_extensions, parse_shard, shard_for_rank


def png(path: Path, w=8, h=8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def ids(sources):
    return [s.id for s in sources]


def finishes(fn, seconds=10.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not finish within {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifo_named_png_in_a_folder_is_skipped_and_never_read(tmp_path):
    png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    got = finishes(lambda: collect_sources([str(tmp_path)]))
    assert ids(got) == ["a.png"]
    # named directly (or reached some other way), reading it fails at once instead of blocking
    with pytest.raises(ImageError, match="not a regular file"):
        finishes(lambda: SourceReader().read(Source("pipe.png", tmp_path / "pipe.png")))
    with pytest.raises(ConfigError, match="neither a regular file"):
        collect_sources([str(tmp_path / "pipe.png")])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_skipped_and_never_read(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    assert ids(finishes(lambda: collect_sources([str(tmp_path)]))) == ["a.png"]
    assert ids(finishes(lambda: collect_sources([str(tmp_path / "*.png")]))) == ["a.png"]
    with pytest.raises(ImageError, match="not a regular file"):
        finishes(lambda: SourceReader().read(Source("zero.png", tmp_path / "zero.png")))


def test_symlink_loops_end_folder_walks_and_globs(tmp_path):
    root = tmp_path / "data"
    png(root / "a.png")
    png(root / "sub" / "b.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)   # sub/loop -> data
    (root / "self").symlink_to(root / "self")                             # a dangling self-loop
    got = finishes(lambda: collect_sources([str(root)]))
    assert ids(got) == ["a.png", "sub/b.png"]  # each real folder entered once
    globbed = finishes(lambda: collect_sources([str(root / "**" / "*.png")]))
    assert ids(globbed) == ["a.png", "sub/b.png"]


def test_symlinked_folder_and_file_are_followed(tmp_path):
    real = tmp_path / "real"
    png(real / "x.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "y.png").symlink_to(real / "x.png")
    assert ids(collect_sources([str(root)])) == ["linked/x.png", "y.png"]
    # a folder reachable by its real path and by a link keeps its real name, and is read once
    (real / "z_sub").mkdir()
    png(real / "z_sub" / "w.png")
    (real / "a_link").symlink_to(real / "z_sub", target_is_directory=True)
    assert ids(collect_sources([str(real)])) == ["x.png", "z_sub/w.png"]


def test_size_cap(tmp_path):
    p = png(tmp_path / "a.png", 64, 64)
    size = p.stat().st_size
    assert SourceReader(max_bytes=size).read(Source("a.png", p)) == p.read_bytes()
    with pytest.raises(ImageError, match="exceeds the limit"):
        SourceReader(max_bytes=size - 1).read(Source("a.png", p))


def test_missing_file_and_directory_are_per_file_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        SourceReader().read(Source("x", tmp_path / "gone.png"))
    with pytest.raises(ImageError, match="is a directory"):
        SourceReader().read(Source("x", tmp_path))


def test_folders_take_every_format_pillow_opens(tmp_path):
    exts = image_extensions()
    assert {".jpg", ".png", ".webp", ".tif", ".bmp", ".gif"} <= exts and ".pdf" not in exts and ".eps" not in exts
    png(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.ppm")  # PPM: not in the old fixed list
    want = ["a.png", "b.ppm"]
    if features.check("avif"):
        assert ".avif" in exts
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "c.avif")
        want.append("c.avif")
    assert ids(collect_sources([str(tmp_path)])) == want


def test_urls_are_not_fetched(tmp_path):
    with pytest.raises(ConfigError, match="img2dataset") as e:
        collect_sources(["https://example.com/cat.jpg"])
    assert "not fetch" in str(e.value) and "\n" not in str(e.value)
    lst = tmp_path / "urls.txt"
    lst.write_text("http://example.com/a.jpg\n")
    with pytest.raises(ConfigError, match="img2dataset"):
        collect_sources([str(lst)])


def test_shard_flag_parses_and_splits_deterministically():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ["4/4", "-1/2", "1", "a/b", "0/0"]:
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    sources = [Source(f"{i:03d}", Path(f"/x/{i}.jpg")) for i in range(23)]
    world = 2  # N=3 jobs of 2 ranks each: global rank I * 2 + r of 6
    shares = [shard_for_rank(sources, i * world + r, 3 * world) for i in range(3) for r in range(world)]
    flat = [s for share in shares for s in share]
    assert sorted(flat, key=lambda s: s.id) == sources and len(set(flat)) == len(flat)
