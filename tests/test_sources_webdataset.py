"""WebDataset .tar shards: keys as ids, brace patterns, byte-range reads (nothing extracted),
the same codes as the images in a folder, and resume after an interruption."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.encode import EncodeOptions, encode_to_store
from viq.errors import ConfigError
from viq.sources import SourceReader, collect_sources, parse_shard, shard_for_rank
from viq.sources.webdataset import expand_braces, sample_key
from viq.store import CodeStore
from viq.tokenizer import load_tokenizer


def image_bytes(seed: int, fmt="PNG", size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, members: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(keys, seed0=0, ext="png"):
    out = {}
    for k, key in enumerate(keys):
        out[f"{key}.{ext}"] = image_bytes(seed0 + k, "PNG" if ext == "png" else "JPEG")
        out[f"{key}.txt"] = f"caption {key}".encode()
        out[f"{key}.json"] = json.dumps({"key": key}).encode()
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_model_dir(d, tiny_config("16k"), seed=0)
    return load_tokenizer(d, parts=("encoder",), device="cpu"), d


def test_brace_expansion_and_keys():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert sample_key("00001/000010023.jpg") == ("00001/000010023", "jpg")
    assert sample_key("abc.seg.png") == ("abc", "seg.png")


def test_members_are_samples_and_reads_are_byte_ranges(tmp_path):
    members = sample_members(["000000001", "000000002"])
    members["000000003.cls"] = b"7"  # a sample without an image is not an input
    shard = write_shard(tmp_path / "shard-000000.tar", members)
    got = collect_sources([str(shard)])
    assert [s.id for s in got] == ["000000001", "000000002"]
    assert all(s.kind == "tar" and s.path == shard for s in got)
    reader = SourceReader()
    for s in got:
        assert reader.read(s) == members[f"{s.id}.png"]
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))  # nothing extracted


def test_brace_pattern_over_shards_and_key_clashes(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"shard-{i:06d}.tar", sample_members([f"{i}{k:04d}" for k in range(2)], 10 * i))
    got = collect_sources([str(tmp_path / "shard-{000000..000002}.tar")])
    assert [s.id for s in got] == ["00000", "00001", "10000", "10001", "20000", "20001"]
    assert [s.id for s in collect_sources([str(tmp_path / "shard-*.tar")])] == [s.id for s in got]
    # the same keys in two shards: every id of that input names its shard
    write_shard(tmp_path / "dup" / "a.tar", sample_members(["k1"]))
    write_shard(tmp_path / "dup" / "b.tar", sample_members(["k1"], 5))
    assert [s.id for s in collect_sources([str(tmp_path / "dup" / "{a,b}.tar")])] == ["a/k1", "b/k1"]


def test_compressed_and_broken_shards_are_usage_errors(tmp_path):
    gz = tmp_path / "s.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        data = image_bytes(0)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match="decompress"):
        collect_sources([str(gz)])
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ConfigError, match="bad.tar"):
        collect_sources([str(bad)])


def test_same_codes_as_a_folder_and_resume(tok, tmp_path):
    tok, _ = tok
    keys = [f"{k:09d}" for k in range(10)]
    members = sample_members(keys)
    shard = write_shard(tmp_path / "shard-000000.tar", members)
    folder = tmp_path / "folder"
    folder.mkdir()
    for key in keys:
        (folder / f"{key}.png").write_bytes(members[f"{key}.png"])

    opts = EncodeOptions(workers=2, rows_per_shard=2, token_budget=8)
    s_tar = encode_to_store(collect_sources([str(shard)]), tok, tmp_path / "tar-store", {}, opts)
    s_dir = encode_to_store(collect_sources([str(folder)]), tok, tmp_path / "dir-store", {}, opts)
    assert s_tar.encoded == s_dir.encoded == 10 and not s_tar.failed
    a, b = CodeStore(tmp_path / "tar-store"), CodeStore(tmp_path / "dir-store")
    for key in keys:
        ra, rb = a.get(key), b.get(f"{key}.png")
        assert np.array_equal(ra.codes, rb.codes) and ra.sha256 == rb.sha256
        assert ra.source == f"{shard}#{key}.png"

    class Stop(Exception):
        pass

    def stop_after(n):
        seen = [0]

        def progress(k):
            seen[0] += k
            if seen[0] >= n:
                raise Stop

        return progress

    resumed = tmp_path / "resumed"
    with pytest.raises(Stop):
        encode_to_store(collect_sources([str(shard)]), tok, resumed, {}, opts, progress=stop_after(4))
    again = encode_to_store(collect_sources([str(shard)]), tok, resumed, {}, opts)
    assert again.skipped >= 4 and again.skipped + again.encoded == 10
    c = CodeStore(resumed)
    assert c.ids() == a.ids() and all(np.array_equal(c.get(k).codes, a.get(k).codes) for k in keys)


def test_shard_jobs_into_one_store_cover_everything_once(tok, tmp_path):
    tok, _ = tok
    shard = write_shard(tmp_path / "s.tar", sample_members([f"{k:03d}" for k in range(7)]))
    sources = collect_sources([str(shard)])
    store = tmp_path / "store"
    total = 0
    for spec in ["0/3", "1/3", "2/3"]:
        i, n = parse_shard(spec)
        s = encode_to_store(sources, tok, store, {}, EncodeOptions(workers=1), rank=i, world_size=n, finalize=False)
        assert s.total == len(shard_for_rank(sources, i, n))
        total += s.encoded
    assert total == 7 and CodeStore(store).ids() == [f"{k:03d}" for k in range(7)]


def test_shard_jobs_into_separate_stores_read_as_one(tok, tmp_path):
    from viq.store_set import CodeStores

    tok, _ = tok
    shard = write_shard(tmp_path / "s.tar", sample_members([f"{k:03d}" for k in range(5)]))
    sources = collect_sources([str(shard)])
    for i in range(2):
        encode_to_store(sources, tok, tmp_path / f"store{i}", {}, EncodeOptions(workers=1), rank=i, world_size=2,
                        finalize=False)
    both = CodeStores([tmp_path / "store0", tmp_path / "store1"])
    assert both.ids() == [f"{k:03d}" for k in range(5)] and "002" in both and len(both) == 5
    one = encode_to_store(sources, tok, tmp_path / "one", {}, EncodeOptions(workers=1))
    assert one.encoded == 5
    ref = CodeStore(tmp_path / "one")
    assert all(np.array_equal(both.get(i).codes, ref.get(i).codes) for i in ref.ids())


def test_cli_shard_jobs_and_a_kill(tok, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    _, model = tok
    shard = write_shard(tmp_path / "s.tar", sample_members([f"{k:03d}" for k in range(24)]))
    base = [sys.executable, "-m", "viqctl", "encode", str(shard), "--model", str(model), "--out", str(tmp_path / "st"),
            "--rows-per-shard", "1", "--token-budget", "8", "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(base + ["--shard", "0/2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "st").glob("shard-*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for spec in ["0/2", "1/2"]:  # job 0 resumes after its kill; job 1 runs into the same store
        p = subprocess.run(base + ["--shard", spec, "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "store not finalized" in p.stderr
    assert CodeStore(tmp_path / "st").ids() == [f"{k:03d}" for k in range(24)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_quick_header_reader_agrees_with_tarfile(tmp_path, fmt):
    from viq.sources.webdataset import _quick_members, _tarfile_members

    path = tmp_path / "s.tar"
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 bytes: ustar prefix, GNU long name or PAX path
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for k, name in enumerate(["a.jpg", f"{long_dir}/0001.png", "./b.png", "folder/c.webp",
                                  "x" * 120 + ".jpg" if fmt != tarfile.USTAR_FORMAT else "y.jpg",
                                  "caf\u00e9.png" if fmt == tarfile.PAX_FORMAT else "cafe.png"]):
            data = image_bytes(k)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.jpg"
        tar.addfile(link)
    assert list(_quick_members(path)) == list(_tarfile_members(path))
    got = collect_sources([str(path)])
    reader = SourceReader()
    with tarfile.open(path) as tar:
        for s in got:
            assert reader.read(s) == tar.extractfile(tar.getmember(s.member if s.member in tar.getnames()
                                                                   else "./" + s.member)).read()


def test_a_damaged_header_is_a_usage_error(tmp_path):
    shard = write_shard(tmp_path / "s.tar", sample_members(["k1", "k2"]))
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1].offset  # where the second member's header starts
    raw = bytearray(shard.read_bytes())
    raw[second:second + 8] = b"garbage!"
    damaged = tmp_path / "d.tar"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=f"damaged tar header at byte {second}"):
        collect_sources([str(damaged)])
