"""reconstruct from an untrusted store: one file per id, always inside --out; a bad id or row is named
and the rest are written (exit 1)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from viq.decode import png_names, reconstruct_store
from viq.encode import model_info
from viq.store import CodeStore, CodeStoreWriter, finalize_store
from viq.tokenizer import load_tokenizer

IDS = ["x.jpg", "x.png", "x.jpg.png", "b.png", "./b.png", "B.PNG", "../../escape.jpg", "a" * 250 + ".jpg",
       "n\x00ul.png", "ok/deep/c.jpg"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, parts=("decoder", "pixel_decoder"), device="cpu")


def make_store(root, tok, ids):
    rng = np.random.default_rng(0)
    with CodeStoreWriter(root, model_info(tok, tok.report.fingerprints), "native") as wr:
        for n, i in enumerate(ids):
            wr.add(i, f"/in/{n}", f"sha{n}", 32, 32, rng.integers(0, tok.codebook_size, size=(2, 2, 4)))
    finalize_store(root)
    return CodeStore(root)


def test_png_names_are_unique_and_inside_the_folder():
    names = png_names(IDS)
    assert len({n.casefold() for n in names.values()}) == len(IDS)
    for n in names.values():
        assert not n.startswith("/") and ".." not in n.split("/") and "\x00" not in n
        assert all(len(part.encode()) <= 255 for part in n.split("/"))
    assert names["ok/deep/c.jpg"] == "ok/deep/c.png" and names["x.jpg.png"] == "x.jpg.png"
    assert png_names(["b.png", "./b.png"]) == {i: names[i] for i in ("b.png", "./b.png")}  # order-free


def test_reconstruct_writes_one_file_per_id_inside_out(tok, tmp_path):
    store = make_store(tmp_path / "s", tok, IDS)
    out = tmp_path / "out"
    summary = reconstruct_store(store, tok, out, decoder="pixel")
    assert not summary.failed, summary.failed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == len(IDS) == len(set(summary.written))
    assert all(p.resolve().is_relative_to(out.resolve()) for p in files)
    assert not (tmp_path / "escape.png").exists()
    again = reconstruct_store(store, tok, out, ids=["x.png"], decoder="pixel")  # names do not depend on --ids
    assert again.skipped == 1 and not again.written


def test_a_bad_id_or_row_is_named_and_the_rest_are_written(tok, tmp_path):
    store = make_store(tmp_path / "s", tok, ["first.jpg", "sub/x.jpg", "z.jpg", "y.jpg"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where a folder is needed")  # sub/x.png cannot be written
    shard = next((tmp_path / "s").glob("shard-*.parquet"))
    t = pq.read_table(shard)
    rows = t.to_pylist()
    row = next(r for r in rows if r["id"] == "y.jpg")
    row["h"] = -1  # a damaged row (negative grid)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), shard)
    summary = reconstruct_store(CodeStore(tmp_path / "s"), tok, out, decoder="pixel")
    failed = {f["id"]: f["reason"] for f in summary.failed}
    assert set(failed) == {"sub/x.jpg", "y.jpg"}
    assert "row" in failed["y.jpg"] and shard.name in failed["y.jpg"]
    assert (out / "first.png").is_file() and (out / "z.png").is_file()

    from viqctl.__main__ import app

    r = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "s"), "--out", str(tmp_path / "out2"),
                                 "--decoder", "pixel", "--device", "cpu"])
    assert r.exit_code == 1, r.output  # some inputs failed, listed; no traceback
    assert "y.jpg" in r.output and "Traceback" not in r.output
    assert (tmp_path / "out2" / "sub" / "x.png").is_file()
