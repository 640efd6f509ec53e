"""Hugging Face datasets inputs (Parquet files and folders, save_to_disk folders) and the code store
read back as a Hugging Face dataset."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.encode import EncodeOptions, encode_to_store
from viq.errors import ConfigError
from viq.sources import InputOptions, SourceReader, collect_sources
from viq.store import CodeStore
from viq.tokenizer import load_tokenizer

HF_META = {b"huggingface": b'{"info": {"features": {"img": {"_type": "Image"}, "uid": {"dtype": "string", '
                           b'"_type": "Value"}}}}'}


def image_bytes(seed: int, size=(20, 12)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def hf_table(n: int, seed0=0) -> pa.Table:
    """The layout `datasets` writes for an Image feature: a {bytes, path} struct plus other columns."""
    imgs = [{"bytes": image_bytes(seed0 + i), "path": f"img{i}.png"} for i in range(n)]
    t = pa.table({"uid": [f"u{seed0 + i:03d}" for i in range(n)],
                  "img": pa.array(imgs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "caption": [f"c{i}" for i in range(n)]})
    return t.replace_schema_metadata(HF_META)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_model_dir(d, tiny_config("16k"), seed=0)
    return load_tokenizer(d, parts=("encoder",), device="cpu")


def test_parquet_rows_by_row_group(tmp_path):
    t = hf_table(7)
    pq.write_table(t, tmp_path / "data.parquet", row_group_size=3)
    got = collect_sources([str(tmp_path / "data.parquet")])
    assert [s.id for s in got] == [f"data/{i:09d}" for i in range(7)]
    assert got[4].kind == "parquet" and got[4].member == "img" and got[4].at == (1, 1)
    reader = SourceReader()
    assert [reader.read(s) for s in got] == [r["bytes"] for r in t.column("img").to_pylist()]


def test_id_column_binary_column_and_choices(tmp_path):
    pq.write_table(hf_table(3), tmp_path / "a.parquet")
    got = collect_sources([str(tmp_path / "a.parquet")], options=InputOptions(id_column="uid"))
    assert [s.id for s in got] == ["u000", "u001", "u002"]
    raw = pa.table({"jpg": [image_bytes(1), image_bytes(2)], "n": [1, 2]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    got = collect_sources([str(tmp_path / "raw.parquet")])
    assert got[0].member == "jpg" and SourceReader().read(got[1]) == image_bytes(2)
    two = pa.table({"a": [b"x"], "b": [b"y"]})
    pq.write_table(two, tmp_path / "two.parquet")
    with pytest.raises(ConfigError, match="--image-column"):
        collect_sources([str(tmp_path / "two.parquet")])
    assert collect_sources([str(tmp_path / "two.parquet")], options=InputOptions(image_column="b"))[0].member == "b"
    with pytest.raises(ConfigError, match="no column 'nope'"):
        collect_sources([str(tmp_path / "a.parquet")], options=InputOptions(id_column="nope"))
    dup = pa.table({"k": ["same", "same"], "jpg": [image_bytes(1), image_bytes(2)]})
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ConfigError, match="'same'"):
        collect_sources([str(tmp_path / "dup.parquet")], options=InputOptions(id_column="k"))


def test_folder_of_parquet_files_hub_layout(tmp_path):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    pq.write_table(hf_table(2), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(hf_table(2, 10), root / "data" / "train-00001-of-00002.parquet")
    got = collect_sources([str(root)])
    assert [s.id for s in got] == ["data/train-00000-of-00002/000000000", "data/train-00000-of-00002/000000001",
                                   "data/train-00001-of-00002/000000000", "data/train-00001-of-00002/000000001"]


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the save_to_disk layout is written by `datasets`")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": image_bytes(i), "path": None} for i in range(3)], "label": [0, 1, 2]}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "saved"))
    got = collect_sources([str(tmp_path / "saved")])
    assert len(got) == 3 and got[0].kind == "arrow" and got[0].member == "image"
    assert SourceReader().read(got[2]) == image_bytes(2)


def test_encode_parquet_resume_and_read_the_store_as_a_dataset(tok, tmp_path):
    pq.write_table(hf_table(8), tmp_path / "data.parquet", row_group_size=3)
    sources = collect_sources([str(tmp_path / "data.parquet")], options=InputOptions(id_column="uid"))
    opts = EncodeOptions(workers=2, rows_per_shard=2, token_budget=4)

    class Stop(Exception):
        pass

    seen = []

    def stop_after_3(n):
        seen.append(n)
        if sum(seen) >= 3:
            raise Stop

    store = tmp_path / "store"
    with pytest.raises(Stop):
        encode_to_store(sources, tok, store, {}, opts, progress=stop_after_3)
    again = encode_to_store(sources, tok, store, {}, opts)
    assert again.skipped >= 2 and again.skipped + again.encoded == 8 and not again.failed
    full = encode_to_store(sources, tok, tmp_path / "full", {}, opts)
    a, b = CodeStore(store), CodeStore(tmp_path / "full")
    assert a.ids() == b.ids() == [f"u{i:03d}" for i in range(8)]
    assert all(np.array_equal(a.get(i).codes, b.get(i).codes) for i in a.ids()) and full.encoded == 8

    # the store as a Hugging Face dataset: ids, codes and grid sizes, failures.jsonl left out
    (store / "failures.jsonl").write_text('{"id": "x", "source": "y", "reason": "z"}\n')
    shards = sorted(str(p) for p in store.glob("shard-*.parquet"))
    try:
        from datasets import load_dataset
    except ImportError:  # the same check with pyarrow alone
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        rows = table.to_pylist()
    else:
        rows = list(load_dataset("parquet", data_files=shards, split="train", cache_dir=str(tmp_path / "hf")))
        whole = load_dataset(str(store), split="train", cache_dir=str(tmp_path / "hf2"))  # the folder itself
        assert sorted(whole["id"]) == a.ids() and set(whole.column_names) >= {"id", "h", "w", "codes"}
    assert sorted(r["id"] for r in rows) == a.ids()
    for r in rows:
        rec = a.get(r["id"])
        assert (r["h"], r["w"]) == (rec.h, rec.w) and len(r["codes"]) == rec.h * rec.w * 4
        assert np.array_equal(np.asarray(r["codes"]).reshape(rec.h, rec.w, 4), rec.codes)


def test_a_share_is_read_in_file_order_one_row_group_at_a_time(tmp_path, monkeypatch):
    import viq.sources.tables as tables
    from viq.sources import shard_for_rank

    t = pa.table({"uid": [f"z{9 - i}" for i in range(9)], "jpg": [image_bytes(i) for i in range(9)]})
    pq.write_table(t, tmp_path / "d.parquet", row_group_size=3)  # ids run against the row order
    sources = collect_sources([str(tmp_path / "d.parquet")], options=InputOptions(id_column="uid"))
    assert [s.id for s in sources] == sorted(s.id for s in sources)
    share = shard_for_rank(sources, 0, 1)
    assert [s.at for s in share] == [(g, r) for g in range(3) for r in range(3)]
    calls = []
    real = tables.read_batch
    monkeypatch.setattr(tables, "read_batch", lambda *a: calls.append(a[3]) or real(*a))
    reader = SourceReader(cache_batches=1)
    assert [reader.read(s) for s in share] == [image_bytes(i) for i in range(9)]
    assert calls == [0, 1, 2]
