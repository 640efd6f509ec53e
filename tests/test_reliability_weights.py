"""Untrusted weights: nothing tampered passes verify or loads, nothing half-written is ever read.

Uses a copy of the bundled demo model (all five parts, ~4.5 MB) and a random tiny model.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.errors import ConfigError, IntegrityError
from viq.tokenizer import DEMO_MODEL, load_tokenizer
from viq.weights.convert import convert
from viq.weights.io import sha256_file
from viq.weights.verify import verify_source

ALL = ("encoder", "pool", "decoder", "drawer", "pixel_decoder")
IMAGE = [("noise", torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1)]


@pytest.fixture
def demo(tmp_path) -> Path:
    d = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL, d)
    return d


def reseal(folder: Path) -> None:
    """Re-record every part's sha256 (a hand-edited but self-consistent folder)."""
    meta = json.loads((folder / "config.json").read_text())
    for entry in meta["parts"].values():
        entry["sha256"] = sha256_file(folder / entry["file"])
        entry["bytes"] = (folder / entry["file"]).stat().st_size
    (folder / "config.json").write_text(json.dumps(meta))


def flip_bit(path: Path, byte_in_float: int, bit: int, which: int = 0) -> None:
    """Flip one bit of the ``which``-th float32 of a safetensors file (byte 0 = lowest mantissa byte)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + n + header[name]["data_offsets"][0] + 4 * which + byte_in_float
    raw[start] ^= 1 << bit
    path.write_bytes(bytes(raw))


def verify_cli(*args):
    from viqctl.__main__ import app

    return CliRunner().invoke(app, ["verify", *map(str, args), "--resize", "native:1024"])


@pytest.mark.parametrize("part,byte,bit", [("pool", 3, 6),            # an exponent bit
                                           ("pixel_decoder", 3, 6),   # an exponent bit
                                           ("drawer", 2, 0),
                                           ("encoder", 0, 0),         # the lowest mantissa bit
                                           ("decoder", 1, 3)])
def test_a_flipped_bit_in_any_part_fails_verify_naming_it(demo, part, byte, bit):
    flip_bit(demo / f"{part}.safetensors", byte, bit)
    result = verify_source(demo, IMAGE, device="cpu")
    assert not result.ok
    assert any(f"{part}.safetensors" in m and f"'{part}' part" in m for m in result.mismatches), result.mismatches
    with pytest.raises(IntegrityError, match=f"{part}.safetensors"):  # and no load accepts it either
        load_tokenizer(demo, parts=(part,), device="cpu")


def test_verify_exit_codes_tampered_and_removed_parts_are_1_a_bad_path_is_2(demo, tmp_path):
    r = verify_cli(demo)
    assert r.exit_code == 0, r.output
    flip_bit(demo / "pool.safetensors", 3, 6)
    r = verify_cli(demo)
    assert r.exit_code == 1 and "pool.safetensors" in r.output
    shutil.copy(DEMO_MODEL / "pool.safetensors", demo / "pool.safetensors")
    (demo / "pixel_decoder.safetensors").unlink()
    r = verify_cli(demo)
    assert r.exit_code == 1 and "pixel_decoder" in r.output and "missing" in r.output
    r = verify_cli(tmp_path / "nowhere")
    assert r.exit_code == 2


def test_verify_runs_the_pool_and_the_pixel_decoder(demo):
    result = verify_source(demo, IMAGE, device="cpu")
    assert result.ok, result.mismatches
    fp = result.fingerprints[0]
    assert {"pooled_sha256", "pooled_abs_sum", "pixel_decoder_sha256"} <= set(fp)
    # a pool or pixel decoder that differs (digests re-recorded, so only the outputs can tell) is caught
    for part, key in (("pool", "pooled_sha256"), ("pixel_decoder", "pixel_decoder_sha256")):
        other = demo.parent / f"other-{part}"
        shutil.copytree(demo, other)
        sd = load_file(other / f"{part}.safetensors")
        name = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1 and v.dim() > 1)
        # added noise, not a scale: a norm after the layer can undo a uniform scale
        g = torch.Generator().manual_seed(1)
        sd[name] = sd[name] + torch.randn(sd[name].shape, generator=g) * (sd[name].std() + 0.1)
        save_file(sd, other / f"{part}.safetensors")
        reseal(other)
        from viq.weights.verify import compare_fingerprints

        checked = verify_source(other, IMAGE, device="cpu")
        assert checked.ok, checked.mismatches
        diffs = compare_fingerprints(result.fingerprints, checked.fingerprints)
        assert any(key in d and f"({part})" in d for d in diffs), diffs


@pytest.mark.parametrize("part,make_bad,says", [
    ("pixel_decoder", lambda t: torch.full_like(t, float("nan")), "NaN"),
    ("encoder", lambda t: t > 0, "dtype bool"),
    ("pool", lambda t: t.to(torch.int32), "dtype int32"),
])
def test_non_finite_or_non_float_tensors_are_refused_naming_them(demo, part, make_bad, says):
    sd = load_file(demo / f"{part}.safetensors")
    name = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[name] = make_bad(sd[name])
    save_file(sd, demo / f"{part}.safetensors")
    reseal(demo)
    with pytest.raises(IntegrityError, match=f"{part}.safetensors.*{name}.*{says}|{says}"):
        load_tokenizer(demo, parts=ALL, device="cpu")
    result = verify_source(demo, IMAGE, device="cpu")
    assert not result.ok and any(name in m for m in result.mismatches)


def test_convert_keeps_every_part_and_refuses_in_place(demo, tmp_path):
    out = tmp_path / "out"
    report = convert(demo, out)
    assert set(report.parts) == set(ALL)  # the pixel decoder is kept, not silently dropped
    a = load_tokenizer(demo, parts=ALL, device="cpu").model.state_dict()
    b = load_tokenizer(out, parts=ALL, device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = convert(demo, tmp_path / "with-ref", reference_layout=True)
    assert any(g.startswith("pixel decoder") for g in ref.dropped)  # no place for it there: listed
    before = (demo / "config.json").read_bytes()
    for target in (demo, demo / "sub"):
        with pytest.raises(ConfigError, match="overwrite the input"):
            convert(demo, target)
    assert (demo / "config.json").read_bytes() == before and not (demo / "sub").exists()


def test_a_convert_failing_mid_write_leaves_the_old_folder_whole(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(demo, out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other"
    random_model_dir(other, tiny_config("16k"), seed=5)

    import viq.weights.save as save

    real, calls = save.write_safetensors, []

    def failing(*args, **kw):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(save, "write_safetensors", failing)
    with pytest.raises(OSError, match="injected"):
        convert(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the old model, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no leftovers
    assert verify_source(out, IMAGE, device="cpu").ok


def test_a_convert_killed_mid_write_leaves_the_old_folder_whole(demo, tmp_path):
    """A real kill (os._exit, no cleanup) after two new parts were written."""
    out = tmp_path / "out"
    convert(demo, out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other"
    random_model_dir(other, tiny_config("16k"), seed=5)
    script = textwrap.dedent(f"""
        import os
        import viq.weights.save as save
        from viq.weights.convert import convert
        real, n = save.write_safetensors, []
        def dying(*a, **k):
            n.append(1)
            if len(n) == 3:
                os._exit(9)
            return real(*a, **k)
        save.write_safetensors = dying
        convert({str(other)!r}, {str(out)!r})
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 9, p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert verify_source(out, IMAGE, device="cpu").ok
    convert(other, out)  # the next publish clears the leftover and replaces the folder whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    a = load_tokenizer(other, parts=("encoder",), device="cpu").model.state_dict()
    b = load_tokenizer(out, parts=("encoder",), device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_publish_refuses_a_folder_that_is_not_viq_weights(demo, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="not a viq weights folder"):
        convert(demo, mine)
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_a_low_bit_flipped_in_a_reference_pth_differs_from_the_original(tmp_path):
    """The published .pth layout records no digests; --against compares the weights as loaded."""
    from conftest import FIXTURES, fixture_config

    if not FIXTURES.is_dir():
        pytest.skip(f"parity fixtures not found at {FIXTURES}")
    from viq.weights.verify import compare_weights, weights_digests

    ref = tmp_path / "converted_16k"
    shutil.copytree(FIXTURES / "converted_16k", ref)
    (ref / "config.json").write_text(json.dumps({"model": fixture_config("16k").model_dump(mode="json")}))
    parts = ("encoder", "decoder")
    before = weights_digests(load_tokenizer(ref, parts=parts, device="cpu"))
    enc = next(ref.glob("model_viq_fsq_*.pth"))
    sd = torch.load(enc, weights_only=True)
    name = next(k for k, v in sd.items() if k.startswith("blocks.") and v.is_floating_point() and v.dim() == 2)
    flat = sd[name].view(-1)
    bits = flat[:1].view(torch.int16) if flat.dtype in (torch.float16, torch.bfloat16) else flat[:1].view(torch.int32)
    bits ^= 1  # the lowest mantissa bit of one weight
    torch.save(sd, enc)
    after = weights_digests(load_tokenizer(ref, parts=parts, device="cpu"))
    diffs = compare_weights(before, after)
    assert diffs and all("encoder part" in d for d in diffs)


def test_a_part_that_is_a_fifo_or_names_another_folder_is_refused_without_reading(demo, tmp_path):
    import os

    (demo / "pool.safetensors").unlink()
    os.mkfifo(demo / "pool.safetensors")  # reading it would block forever
    with pytest.raises(IntegrityError, match="pool"):
        load_tokenizer(demo, parts=("pool",), device="cpu")
    meta = json.loads((demo / "config.json").read_text())
    meta["parts"]["drawer"]["file"] = "../outside.safetensors"
    (demo / "config.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="not a file of the folder"):
        load_tokenizer(demo, parts=("drawer",), device="cpu")


def test_verify_of_parts_failing_their_digest_prints_the_failure_lines_and_no_empty_table(demo):
    flip_bit(demo / "encoder.safetensors", 3, 6)
    r = verify_cli(demo)
    assert r.exit_code == 1 and "encoder.safetensors" in r.output
    assert "mismatch" in r.output
    assert "fingerprints (" not in r.output and "codes sum" not in r.output  # nothing ran: no table
    shutil.copy(DEMO_MODEL / "encoder.safetensors", demo / "encoder.safetensors")
    r = verify_cli(demo)  # a sound folder still prints its table
    assert r.exit_code == 0 and "fingerprints (" in r.output and "codes sum" in r.output
