"""viq.sources: folders, globs and list files become a sorted list of (id, absolute path)."""

import hashlib
import json
from pathlib import Path

import pytest

from viq.errors import ConfigError
from viq.sources import Source, collect_sources, sha256_file, shard_for_rank


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.TIFF", "e.jpeg", "f.bmp", "g.gif", "h.tif"]:
        touch(root / name)
    for name in ["notes.txt", ".hidden.jpg", ".cache/x.jpg", "sub/readme.md"]:
        touch(root / name)
    return root


def ids(sources):
    return [s.id for s in sources]


def test_folder_is_walked_recursively_with_relative_ids(tree):
    got = collect_sources([str(tree)])
    assert ids(got) == ["a.PNG", "b.jpg", "e.jpeg", "f.bmp", "g.gif", "h.tif", "sub/c.webp",
                        "sub/deeper/d.TIFF"]
    assert all(s.path.is_absolute() and s.path == tree.joinpath(s.id) for s in got)
    flat = collect_sources([str(tree)], recursive=False)
    assert "sub/c.webp" not in ids(flat) and "b.jpg" in ids(flat)


def test_single_file_id_is_its_name(tree):
    assert collect_sources([str(tree / "sub" / "c.webp")]) == [Source("c.webp", tree / "sub" / "c.webp")]


def test_glob_ids_are_relative_to_the_fixed_folders(tree):
    got = collect_sources([str(tree / "**" / "*.*")])
    assert ids(got) == ids(collect_sources([str(tree)]))
    assert ids(collect_sources([str(tree / "sub" / "*.webp")])) == ["c.webp"]
    with pytest.raises(ConfigError, match="matches no image"):
        collect_sources([str(tree / "*.xyz")])


def test_relative_glob(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    got = collect_sources(["imgs/*.jpg"])
    assert got == [Source("b.jpg", tree / "b.jpg")]


def test_txt_list(tree, tmp_path):
    lst = tmp_path / "lists" / "l.txt"
    touch(lst, f"# my images\n\n../imgs/b.jpg\n  {tree / 'sub' / 'c.webp'}  \nmissing.jpg\n".encode())
    got = collect_sources([str(lst)])
    assert got == sorted([Source("../imgs/b.jpg", tree / "b.jpg"),
                          Source(str(tree / "sub" / "c.webp"), tree / "sub" / "c.webp"),
                          Source("missing.jpg", tmp_path / "lists" / "missing.jpg")], key=lambda s: s.id)
    assert all(".." not in s.path.parts for s in got)


def test_jsonl_list(tree, tmp_path):
    lst = tmp_path / "l.jsonl"
    rows = [{"path": "imgs/b.jpg", "id": "cat-1"}, {"image": "imgs/a.PNG"}, {"path": "gone.jpg", "id": 7}]
    touch(lst, ("\n".join(json.dumps(r) for r in rows) + "\n\n").encode())
    got = collect_sources([str(lst)])
    assert got == [Source("7", tmp_path / "gone.jpg"), Source("cat-1", tree / "b.jpg"),
                   Source("imgs/a.PNG", tree / "a.PNG")]


@pytest.mark.parametrize("line,words", [("not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                        ('{"id": "x"}', "'path'"), ('{"path": "a.jpg", "id": [1]}', "'id'")])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, words):
    lst = touch(tmp_path / "bad.jsonl", f'{{"path": "ok.jpg"}}\n{line}\n'.encode())
    with pytest.raises(ConfigError, match=words) as e:
        collect_sources([str(lst)])
    assert f"{lst}:2" in str(e.value)


def test_missing_inputs_are_usage_errors(tmp_path):
    for bad in [tmp_path / "nothing.jpg", tmp_path / "nofolder", tmp_path / "nolist.txt"]:
        with pytest.raises(ConfigError, match="not found") as e:
            collect_sources([str(bad)])
        assert str(bad) in str(e.value)


def test_same_file_twice_is_kept_once_but_clashing_ids_are_refused(tree, tmp_path):
    got = collect_sources([str(tree), str(tree / "*.jpg")])
    assert ids(got).count("b.jpg") == 1
    other = tmp_path / "other"
    touch(other / "b.jpg")
    with pytest.raises(ConfigError, match="b.jpg") as e:
        collect_sources([str(tree), str(other)])
    assert str(other / "b.jpg") in str(e.value) and str(tree / "b.jpg") in str(e.value)


def test_order_does_not_depend_on_input_order(tree, tmp_path):
    touch(tmp_path / "z" / "zz.png")
    a = collect_sources([str(tree), str(tmp_path / "z" / "zz.png")])
    b = collect_sources([str(tmp_path / "z" / "zz.png"), str(tree)])
    assert a == b and ids(a) == sorted(ids(a))


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000
    path = touch(tmp_path / "f.bin", data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest() == sha256_file(path)
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "gone.bin")


@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (10, 1), (10, 3), (17, 4), (5, 8)])
def test_shards_cover_everything_once(n, world):
    sources = [Source(f"{i:03d}", Path(f"/x/{i}.jpg")) for i in range(n)][::-1]
    shards = [shard_for_rank(sources, r, world) for r in range(world)]
    flat = [s for shard in shards for s in shard]
    assert sorted(flat, key=lambda s: s.id) == sorted(sources, key=lambda s: s.id)
    assert len(set(flat)) == len(flat)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard_for_rank(list(reversed(sources)), r, world) for r in range(world)]
    if n >= world:
        assert shards[1 % world][0].id == f"{1 % world:03d}"


def test_bad_rank():
    for rank, world in [(-1, 2), (2, 2), (0, 0)]:
        with pytest.raises(ConfigError):
            shard_for_rank([], rank, world)
