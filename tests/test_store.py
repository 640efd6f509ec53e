"""Code store: round trips, crash safety, resume, supersede, ranks, refusals, corrupt files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from viq.errors import StoreError
from viq.store import CodeStore, CodeStoreWriter, codes_dtype, finalize_store

MODEL = {"name": "tiny", "fingerprint": "abc123", "levels": [8, 8, 8, 6, 5], "codebook_size": 15360}
PRE = "native"


def make_items(n, codebook_size=15360, seed=0, prefix="img"):
    """n fake images: (id, source, sha256, width, height, codes) with varying grid sizes."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        codes = rng.integers(0, codebook_size, size=(h, w, 4))
        items.append((f"{prefix}{i:03d}", f"/data/{prefix}{i:03d}.png", f"sha{seed}-{i}", 16 * w, 16 * h, codes))
    return items


def write(root, items, model=MODEL, rows_per_shard=4, finalize=True, **kw):
    with CodeStoreWriter(root, model, PRE, rows_per_shard=rows_per_shard, **kw) as wr:
        for it in items:
            if wr.needs_encoding(it[0], it[2]):
                wr.add(*it)
    if finalize:
        finalize_store(root)


def snapshot(root):
    store = CodeStore(root)
    return {r.id: (r.source, r.sha256, r.preprocess, r.width, r.height, r.h, r.w, r.codes.tolist()) for r in store}


def all_shard_ids(root):
    return [i for p in sorted(root.glob("shard-*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]


def test_codes_dtype():
    assert codes_dtype(15360) == np.uint16
    assert codes_dtype(65536) == np.uint16
    assert codes_dtype(65537) == np.int32


@pytest.mark.parametrize("size,arrow_type", [(64000, pa.uint16()), (100000, pa.int32())])
def test_roundtrip(tmp_path, size, arrow_type):
    model = {**MODEL, "levels": [size], "codebook_size": size}
    items = make_items(10, codebook_size=size)
    items[0] = items[0][:5] + (np.full((2, 3, 4), size - 1),)  # the largest code survives the dtype
    write(tmp_path, items, model=model)

    store = CodeStore(tmp_path)
    assert len(store) == 10 and store.ids() == sorted(i[0] for i in items)
    assert store.manifest["codes_dtype"] == np.dtype(codes_dtype(size)).name
    assert store.manifest["counts"] == {"images": 10, "failures": 0, "shards": 3}
    for id_, source, sha, width, height, codes in items:
        rec = store.get(id_)
        assert (rec.source, rec.sha256, rec.preprocess, rec.width, rec.height) == (source, sha, PRE, width, height)
        assert (rec.h, rec.w) == codes.shape[:2] and rec.codes.dtype == np.int64
        np.testing.assert_array_equal(rec.codes, codes)
    assert "nope" not in store and items[3][0] in store
    with pytest.raises(KeyError):
        store.get("nope")
    assert [r.id for r in store] == store.ids()
    assert store.to_torch(items[1][0]).shape == items[1][5].shape

    table = pq.read_table(next(tmp_path.glob("shard-*.parquet")))  # plain pyarrow opens a shard as is
    assert table.schema.field("codes").type == pa.list_(arrow_type)
    row = table.slice(0, 1).to_pylist()[0]
    src = {i[0]: i for i in items}[row["id"]]
    assert row["codes"] == src[5].reshape(-1).tolist()  # flat order 4*(r*w + c) + j

    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers get a copy without open files
    np.testing.assert_array_equal(clone.get(items[2][0]).codes, items[2][5])


def test_shard_rollover(tmp_path):
    write(tmp_path, make_items(7), rows_per_shard=3)
    names = sorted(p.name for p in tmp_path.glob("shard-*.parquet"))
    assert names == [f"shard-r00000-{i:06d}.parquet" for i in range(3)]
    assert [s["rows"] for s in CodeStore(tmp_path).manifest["shards"]] == [3, 3, 1]


def test_bad_codes_refused(tmp_path):
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        with pytest.raises(StoreError, match="outside"):
            wr.add("a", "a.png", "s", 16, 16, np.full((1, 1, 4), 15360))
        with pytest.raises(StoreError, match="shape"):
            wr.add("a", "a.png", "s", 16, 16, np.zeros((1, 1, 5), dtype=int))


def test_kill_leaves_only_whole_shards(tmp_path):
    items = make_items(5)
    wr = CodeStoreWriter(tmp_path, MODEL, PRE, rows_per_shard=2)
    for it in items:
        wr.add(*it)  # two shards flushed, one row queued; the "process dies" without close()
    stray = tmp_path / ".tmp-r00000-deadbeef"
    stray.write_bytes(b"half a parquet file")

    wr2 = CodeStoreWriter(tmp_path, MODEL, PRE, rows_per_shard=2)
    assert not stray.exists()
    assert wr2.finished() == {it[0]: it[2] for it in items[:4]}
    assert not wr2.needs_encoding(items[0][0], items[0][2])
    assert wr2.needs_encoding(items[4][0], items[4][2])


def test_resume_equals_uninterrupted(tmp_path):
    items = make_items(11)
    write(tmp_path / "full", items)

    part = tmp_path / "part"
    wr = CodeStoreWriter(part, MODEL, PRE, rows_per_shard=4)
    for it in items[:6]:
        wr.add(*it)  # dies with rows 4 and 5 unflushed
    (part / ".tmp-r00000-x").write_bytes(b"junk")
    write(part, items)
    assert snapshot(part) == snapshot(tmp_path / "full")
    assert sorted(all_shard_ids(part)) == sorted(i[0] for i in items)


def test_changed_source_is_reencoded(tmp_path):
    items = make_items(6)
    write(tmp_path, items)
    changed = list(items)
    changed[2] = items[2][:2] + ("new-sha",) + items[2][3:5] + (np.zeros((3, 2, 4), dtype=np.int64),)
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        todo = [it for it in changed if wr.needs_encoding(it[0], it[2])]
        assert [t[0] for t in todo] == [items[2][0]]
        for it in todo:
            wr.add(*it)
    assert CodeStore(tmp_path).get(items[2][0]).sha256 == "new-sha"  # newest wins before finalize too
    finalize_store(tmp_path)

    ids = all_shard_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 6  # the old row is gone from the files themselves
    rec = CodeStore(tmp_path).get(items[2][0])
    assert rec.sha256 == "new-sha" and rec.codes.shape == (3, 2, 4) and not rec.codes.any()


def test_failure_then_success_and_success_then_failure(tmp_path):
    items = make_items(4)
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        for it in items[:2]:
            wr.add(*it)
        wr.add_failure(items[2][0], items[2][1], "truncated file")
        wr.add_failure(items[3][0], items[3][1], "too large")
    finalize_store(tmp_path)
    assert [f["id"] for f in CodeStore(tmp_path).failures()] == [items[2][0], items[3][0]]
    assert not list(tmp_path.glob("failures-r*.jsonl"))

    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        assert wr.needs_encoding(items[2][0], items[2][2])
        wr.add(*items[2])  # the failure now succeeds
        wr.add_failure(items[0][0], items[0][1], "changed and now unreadable")  # the success now fails
    manifest = finalize_store(tmp_path)

    store = CodeStore(tmp_path)
    assert [f["id"] for f in store.failures()] == [items[0][0], items[3][0]]
    assert store.failures()[0] == {"source": items[0][1], "id": items[0][0], "reason": "changed and now unreadable"}
    assert store.ids() == [items[1][0], items[2][0]]
    assert manifest["counts"] == {"images": 2, "failures": 2, "shards": len(manifest["shards"])}
    lines = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [items[0][0], items[3][0]]


def test_two_ranks_then_resume_with_one(tmp_path):
    items = make_items(9)
    writers = [CodeStoreWriter(tmp_path, MODEL, PRE, rank=r, world_size=2, rows_per_shard=2) for r in range(2)]
    for i, it in enumerate(items[:8]):
        writers[i % 2].add(*it)
    writers[1].add_failure("bad", "/data/bad.png", "not an image")
    for wr in writers:
        wr.close()
    assert {p.name[:12] for p in tmp_path.glob("shard-*")} == {"shard-r00000", "shard-r00001"}
    finalize_store(tmp_path)
    store = CodeStore(tmp_path)
    assert store.ids() == sorted(it[0] for it in items[:8])
    assert [f["id"] for f in store.failures()] == ["bad"]

    with CodeStoreWriter(tmp_path, MODEL, PRE, rank=0, world_size=1) as wr:  # world size changed
        assert set(wr.finished()) == {it[0] for it in items[:8]}
        wr.add(*items[8])
    finalize_store(tmp_path)
    assert len(CodeStore(tmp_path)) == 9


def test_finalize_is_idempotent(tmp_path):
    items = make_items(6)
    write(tmp_path, items, finalize=False)
    first = finalize_store(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "manifest.json"}
    second = finalize_store(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "manifest.json"} == files
    drop = ("updated",)
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}


@pytest.mark.parametrize("change", [{"levels": [8, 8, 8, 5, 5, 5], "codebook_size": 64000},
                                    {"fingerprint": "other"}])
def test_other_model_refused(tmp_path, change):
    write(tmp_path, make_items(2))
    with pytest.raises(StoreError, match="another --out"):
        CodeStoreWriter(tmp_path, {**MODEL, **change}, PRE)
    CodeStoreWriter(tmp_path, {**MODEL, "name": "renamed"}, PRE).close()  # the name alone is no identity


def test_other_preprocess_and_foreign_dir_refused(tmp_path):
    write(tmp_path / "s", make_items(2))
    with pytest.raises(StoreError, match="preprocess"):
        CodeStoreWriter(tmp_path / "s", MODEL, "area:256")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a viq code store"):
        CodeStoreWriter(tmp_path / "f", MODEL, PRE)


def test_corrupt_files_are_named(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        CodeStore(tmp_path)
    write(tmp_path, make_items(5))
    shard = sorted(tmp_path.glob("shard-*.parquet"))[1]
    shard.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(StoreError, match=shard.name):
        len(CodeStore(tmp_path))
    (tmp_path / "manifest.json").write_text("{ broken")
    with pytest.raises(StoreError, match="manifest.json"):
        CodeStore(tmp_path)


def test_half_written_failure_line_is_ignored(tmp_path):
    items = make_items(2)
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        wr.add(*items[0])
        wr.add_failure("bad", "/data/bad.png", "not an image")
    with open(tmp_path / "failures-r00000.jsonl", "a") as f:
        f.write('{"source": "/data/cut.png", "id": "cu')  # killed mid-line
    assert [f["id"] for f in CodeStore(tmp_path).failures()] == ["bad"]
    finalize_store(tmp_path)
    assert [f["id"] for f in CodeStore(tmp_path).failures()] == ["bad"]


def test_resume_after_killed_finalize_keeps_new_rows(tmp_path):
    """A finalize killed after deleting an emptied shard must not let old failures beat new rows."""
    items = make_items(3)
    write(tmp_path, items[:2], rows_per_shard=1)  # shards 0 and 1
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        wr.add_failure(items[1][0], items[1][1], "changed and unreadable")  # newer than shard 1
    (tmp_path / "shard-r00000-000001.parquet").unlink()  # what finalize did before it was killed
    with CodeStoreWriter(tmp_path, MODEL, PRE) as wr:
        assert wr.needs_encoding(items[1][0], items[1][2])
        wr.add(*items[1])  # fixed again: this row is the newest entry
    finalize_store(tmp_path)
    store = CodeStore(tmp_path)
    assert store.ids() == [items[0][0], items[1][0]] and store.failures() == []
