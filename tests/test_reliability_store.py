"""Untrusted code stores: names, ids and bytes are never silently wrong.

Tiny stores written in the test (fake codes); no model needed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from viq.errors import StoreError
from viq.store import CodeStore, CodeStoreWriter, clean_text, finalize_store, row_digest

MODEL = {"name": "tiny", "fingerprint": "abc123", "levels": [8, 8, 8, 6, 5], "codebook_size": 15360}
PRE = "native"


def item(i, sha="s", source=None, seed=None, id_=None):
    rng = np.random.default_rng(i if seed is None else seed)
    h, w = 2 + i % 3, 3
    return (id_ or f"img{i:02d}.png", source or f"/data/img{i:02d}.png", f"{sha}{i}", 16 * w, 16 * h,
            rng.integers(0, 15360, size=(h, w, 4)))


def write(root, items, finalize=True, rows_per_shard=64):
    with CodeStoreWriter(root, MODEL, PRE, rows_per_shard=rows_per_shard) as wr:
        for it in items:
            if wr.needs_encoding(it[0], it[2]):
                wr.add(*it)
    if finalize:
        finalize_store(root)
    return wr


def snapshot(root):
    return {r.id: (r.source, r.sha256, r.width, r.height, r.codes.tolist()) for r in CodeStore(root)}


def only_shard(root):
    (shard,) = sorted(root.glob("shard-*.parquet"))
    return shard


def rewrite(shard, table):
    pq.write_table(table, shard, row_group_size=32, compression="zstd")


# ---- names and ids --------------------------------------------------------------------------------

def test_a_name_that_is_not_utf8_is_stored_escaped_and_the_shard_survives(tmp_path):
    raw = b"\xff\xfe.jpg".decode("utf-8", "surrogateescape")  # what os.listdir gives for that name
    items = [item(0), item(1, id_=raw, source=f"/data/{raw}"), item(2)]
    write(tmp_path / "s", items)
    store = CodeStore(tmp_path / "s")
    assert len(store) == 3  # every row of the shard is there
    assert store.ids()[0] == "\\xff\\xfe.jpg" and raw in store  # escaped, and found by the raw name too
    rec = store.get(raw)
    assert rec.source == "/data/\\xff\\xfe.jpg" and rec.codes.tolist() == items[1][5].tolist()
    wr = write(tmp_path / "s", items)  # a rerun finds it done: nothing encoded again
    assert wr.added == 0
    assert clean_text("plain.png") == "plain.png"


def test_the_same_id_from_another_file_in_a_later_run_is_refused(tmp_path):
    write(tmp_path / "s", [item(0, id_="x.jpg", source="/a/x.jpg", sha="a")])
    before = snapshot(tmp_path / "s")
    with pytest.raises(StoreError, match="x.jpg.*/a/x.jpg.*/b/x.jpg.*explicit ids") as exc:
        write(tmp_path / "s", [item(0, id_="x.jpg", source="/b/x.jpg", sha="b", seed=9)])
    assert exc.value.exit_code == 2
    finalize_store(tmp_path / "s")
    assert snapshot(tmp_path / "s") == before  # a's row is still the one there
    # the same file again (changed content) is a normal re-encode, not a clash
    write(tmp_path / "s", [item(0, id_="x.jpg", source="/a/x.jpg", sha="a2", seed=5)])
    assert CodeStore(tmp_path / "s").get("x.jpg").sha256 == "a20"
    # a failure may not hide another file's row either
    with CodeStoreWriter(tmp_path / "s", MODEL, PRE) as wr, pytest.raises(StoreError, match="/b/x.jpg"):
        wr.add_failure("x.jpg", "/b/x.jpg", "broken")


def test_encode_of_two_folders_with_one_file_name_into_one_store_exits_2(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from viqctl.__main__ import app

    for folder, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / folder / "x.png")
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    first = snapshot(tmp_path / "s")
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "b"), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 2 and "x.png" in r.output, r.output
    assert snapshot(tmp_path / "s") == first


# ---- bytes ----------------------------------------------------------------------------------------

def test_a_flipped_byte_anywhere_in_a_shard_is_detected_or_harmless(tmp_path):
    root = tmp_path / "s"
    write(root, [item(i) for i in range(3)])
    shard = only_shard(root)
    good, original = snapshot(root), shard.read_bytes()
    footer = int.from_bytes(original[-8:-4], "little") + 8
    silent = []
    for pos in range(4, len(original) - footer, 3):  # every third byte of the data pages
        for bit in (0, 6):
            bad = bytearray(original)
            bad[pos] ^= 1 << bit
            shard.write_bytes(bytes(bad))
            try:
                if snapshot(root) != good:
                    silent.append((pos, bit))
            except StoreError as exc:
                assert shard.name in str(exc)
    shard.write_bytes(original)
    assert not silent, f"flips that changed the codes silently: {silent[:5]}"


def test_a_flipped_byte_names_shard_and_row(tmp_path):
    root = tmp_path / "s"
    write(root, [item(i) for i in range(3)])
    shard = only_shard(root)
    t = pq.read_table(shard)
    codes = t.column("codes").to_pylist()
    codes[1][0] ^= 1  # a bit flip that still decodes (as if written past the checksums)
    rewrite(shard, t.set_column(t.schema.get_field_index("codes"), "codes", pa.array(codes, t.schema.field("codes").type)))
    store = CodeStore(root)
    assert store.get("img00.png") and store.get("img02.png")
    with pytest.raises(StoreError, match=f"{shard.name}: row 1 .*img01.png.*digest"):
        store.get("img01.png")


def _append_duplicate(shard, i, change):
    t = pq.read_table(shard)
    row = t.slice(i, 1).to_pylist()[0]
    change(row)
    extra = pa.Table.from_pylist([row], schema=t.schema)
    rewrite(shard, pa.concat_tables([t, extra]))


@pytest.mark.parametrize("forge_digest", [False, True])
def test_an_appended_duplicate_row_is_never_preferred(tmp_path, forge_digest):
    root = tmp_path / "s"
    items = [item(i) for i in range(3)]
    write(root, items)
    good = snapshot(root)
    shard = only_shard(root)

    def change(row):
        row["codes"] = [(c + 1) % 15360 for c in row["codes"]]
        if forge_digest:  # whoever appended it also computed a matching digest
            row["digest"] = row_digest(row["id"], row["source"], row["sha256"], row["preprocess"], row["width"],
                                       row["height"], row["h"], row["w"], np.array(row["codes"], np.uint16))

    _append_duplicate(shard, 1, change)
    assert snapshot(root) == good  # the reader keeps the original
    wr = write(root, items)  # a resume encodes nothing and its finalize keeps the good row
    assert wr.added == 0
    assert snapshot(root) == good and len(pq.read_table(only_shard(root))) == 3


def test_an_out_of_range_code_is_named_and_redone_on_resume(tmp_path):
    root = tmp_path / "s"
    items = [item(i) for i in range(3)]
    write(root, items)
    good = snapshot(root)
    shard = only_shard(root)
    t = pq.read_table(shard)
    rows = t.to_pylist()
    rows[2]["codes"][0] = 60000  # valid uint16, but past the 15360-entry codebook
    r = rows[2]
    r["digest"] = row_digest(r["id"], r["source"], r["sha256"], r["preprocess"], r["width"], r["height"], r["h"],
                             r["w"], np.array(r["codes"], np.uint16))  # digest consistent: the range must tell
    rewrite(shard, pa.Table.from_pylist(rows, schema=t.schema))
    with pytest.raises(StoreError, match=f"{shard.name}.*row 2.*outside"):
        CodeStore(root).get("img02.png")
    with CodeStoreWriter(root, MODEL, PRE) as wr:
        assert [d["id"] for d in wr.damaged] == ["img02.png"]
        assert wr.needs_encoding(items[2][0], items[2][2]) and not wr.needs_encoding(items[0][0], items[0][2])
        wr.add(*items[2])
    finalize_store(root)
    assert snapshot(root) == good and not CodeStore(root).failures()


def test_a_damaged_row_whose_input_is_gone_becomes_a_listed_failure(tmp_path):
    root = tmp_path / "s"
    write(root, [item(i) for i in range(3)])
    shard = only_shard(root)
    t = pq.read_table(shard)
    rows = t.to_pylist()
    rows[0]["h"] = -1  # a negative grid: an error naming it, never a traceback
    rewrite(shard, pa.Table.from_pylist(rows, schema=t.schema))
    with pytest.raises(StoreError, match="row 0.*img00.png"):
        CodeStore(root).get("img00.png")
    finalize_store(root)
    store = CodeStore(root)
    assert store.ids() == ["img01.png", "img02.png"]
    (f,) = store.failures()
    assert f["id"] == "img00.png" and "row 0 is damaged" in f["reason"]


# ---- through the commands -------------------------------------------------------------------------

def _png(path_bytes: bytes, colour) -> None:
    import io
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    fd = os.open(path_bytes, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, buf.getvalue())
    os.close(fd)


def test_encode_of_a_folder_with_a_non_utf8_file_name_keeps_every_row(tmp_path):
    import os

    from typer.testing import CliRunner

    from viqctl.__main__ import app

    folder = tmp_path / "in"
    folder.mkdir()
    _png(os.fsencode(folder) + b"/\xff\xfe.png", (255, 0, 0))
    _png(os.fsencode(folder) + b"/plain.png", (0, 255, 0))
    r = CliRunner().invoke(app, ["encode", str(folder), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    store = CodeStore(tmp_path / "s")
    assert store.ids() == ["\\xff\\xfe.png", "plain.png"] and not store.failures()
    r = CliRunner().invoke(app, ["encode", str(folder), "--out", str(tmp_path / "s"), "--device", "cpu",
                                 "--json"])
    assert r.exit_code == 0 and '"encoded": 0' in r.output  # the rerun finds both done


def test_embed_of_a_store_with_a_flipped_byte_fails_naming_the_shard(tmp_path):
    from typer.testing import CliRunner

    from viq.encode import model_info
    from viq.tokenizer import load_tokenizer
    from viqctl.__main__ import app

    tok = load_tokenizer(None, parts=("decoder",), device="cpu")
    root = tmp_path / "s"
    rng = np.random.default_rng(0)
    with CodeStoreWriter(root, model_info(tok, tok.report.fingerprints), PRE) as wr:
        for i in range(3):
            wr.add(f"i{i}.png", f"/in/i{i}.png", f"sha{i}", 32, 32, rng.integers(0, tok.codebook_size, (2, 2, 4)))
    finalize_store(root)
    shard = only_shard(root)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # inside the data pages
    shard.write_bytes(bytes(raw))
    r = CliRunner().invoke(app, ["embed", str(root), "--out", str(tmp_path / "f.safetensors"), "--device", "cpu"])
    assert r.exit_code == 2 and shard.name in r.output, r.output


def test_a_resumed_encode_lists_the_damaged_rows_it_redid(tmp_path):
    import json

    from typer.testing import CliRunner

    from viqctl.__main__ import app

    folder = tmp_path / "in"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(str(folder / f"p{i}.png").encode(), colour)
    root = tmp_path / "s"
    cmd = ["encode", str(folder), "--out", str(root), "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["redone"] == [] and first["redone_count"] == 0
    good = snapshot(root)

    def damage(id_):
        """Other codes in ``id_``'s newest row: its digest no longer matches."""
        for shard in sorted(root.glob("shard-*.parquet"), reverse=True):
            t = pq.read_table(shard)
            rows = t.to_pylist()
            for k, row in enumerate(rows):
                if row["id"] == id_:
                    row["codes"] = [(c + 1) % 4 for c in row["codes"]]
                    rewrite(shard, pa.Table.from_pylist(rows, schema=t.schema))
                    return shard, k

    shard, k = damage("p1.png")
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["redone_count"] == 1 and summary["encoded"] == 1 and summary["skipped"] == 2
    (rec,) = summary["redone"]
    assert rec["id"] == "p1.png" and f"{shard.name}: row {k} is damaged" in rec["reason"]
    assert f"redone p1.png: {shard.name}: row {k} is damaged" in r.stderr  # named on stderr, one line
    assert snapshot(root) == good  # the row is back as it was

    shard, k = damage("p1.png")  # damaged again: the table says it too
    r = CliRunner().invoke(app, cmd[:-1])
    assert r.exit_code == 0 and f"redone p1.png: {shard.name}" in r.stderr and "redone" in r.stdout and "encode it again" not in r.stderr.split("redone:")[1], r.output
    r = CliRunner().invoke(app, cmd[:-1])  # a clean rerun redoes nothing and says nothing of it
    assert r.exit_code == 0 and "redone" not in r.output
