"""viqctl eval and reconstruct --decoder: metrics from images or a store, clear errors without a pixel decoder."""

import json

import pytest
import torch

from conftest import reference_dir_with_config, viqctl_in_process
from viq.config import tiny_config
from viq.config import PixelDecoderConfig
from viq.demo import random_model_dir
from viq.tokenizer import load_tokenizer


cli = viqctl_in_process  # what the commands do; the entry point itself: test_cli_install.py


def test_eval_images_and_store(tmp_path):
    from PIL import Image

    ref = reference_dir_with_config(tmp_path, "16k")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(48, 32), (40, 40)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(imgs / f"{i}.png")
    p = cli("eval", imgs, "--model", ref, "--json", "--grid", tmp_path / "grid.png")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["images"] == 2 and 0 < res["psnr"] < 100 and -1 <= res["ssim"] <= 1
    assert res["lpips"] is None and res["rfid"] is None  # no weights given: skipped, said on stderr
    assert res["codebook"]["codebook_size"] == 15360 and res["bits_per_pixel"]["bpp_original"] > 0
    assert (tmp_path / "grid.png").is_file()
    p = cli("encode", imgs, "--model", ref, "--out", tmp_path / "codes")
    assert p.returncode == 0, p.stderr
    p = cli("eval", tmp_path / "codes", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["psnr"] == pytest.approx(res["psnr"], rel=1e-4)  # packed vs one by one


def test_pixel_decoder_part_round_trip_and_reconstruct(tmp_path):
    cfg = tiny_config("16k").model_copy(update={"pixel_decoder": PixelDecoderConfig(
        width=64, adapter_dim=32, adapter_heads=4, adapter_blocks=1, channels=[32, 32, 16, 16, 8], res_blocks=1,
        mid_blocks=0, latent_channels=None, groups=4)})
    random_model_dir(tmp_path / "m", cfg)
    tok = load_tokenizer(tmp_path / "m", parts=("encoder", "decoder", "pixel_decoder"), device="cpu")
    codes = tok.encode_pixels([torch.rand(3, 40, 56) * 2 - 1])
    img = tok.reconstruct(codes, decoder="pixel")[0]
    assert img.shape == (48, 64, 3) and img.dtype == torch.uint8
    without = tmp_path / "plain"
    random_model_dir(without, tiny_config("16k"))
    p = cli("encode", tmp_path, "--model", without, "--out", tmp_path / "codes", "--resize", "none")
    p = cli("reconstruct", tmp_path / "codes", "--out", tmp_path / "r", "--decoder", "pixel")
    assert p.returncode == 2 and "pixel_decoder" in p.stderr


def test_eval_reads_tar_parquet_and_llava_inputs_as_encode_does(tmp_path):
    """Tar members, Parquet rows and LLaVA images go through encode's SourceReader, never as file paths."""
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from typer.testing import CliRunner

    from viqctl.__main__ import app

    rng = np.random.default_rng(0)
    data = {}
    for key, (w, h) in (("a", (48, 32)), ("b", (32, 40))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        data[key] = buf.getvalue()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for key, raw in data.items():
        (folder / f"{key}.png").write_bytes(raw)
    shard = tmp_path / "shard-000000.tar"

    def write_shard(images):
        with tarfile.open(shard, "w") as tar:
            for key, raw in images.items():
                for name, blob in ((f"{key}.png", raw), (f"{key}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))

    write_shard(data)
    table = tmp_path / "data.parquet"
    pq.write_table(pa.table({"uid": list(data), "picture": pa.array(list(data.values()), pa.binary())}), table)
    llava = tmp_path / "llava.json"
    turn = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "noise"}]
    llava.write_text(json.dumps([{"id": f"s{i}", "image": f"{k}.png", "conversations": turn}
                                 for i, k in enumerate(["a", "b", "a"])]))  # "a" twice: evaluated once

    def run(*args):
        r = CliRunner().invoke(app, ["eval", *map(str, args), "--device", "cpu", "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["failures"] == [] and res["images"] == 2, res
        return res

    want = run(folder)
    for args, names in [((shard,), ["a", "b"]),
                        ((table, "--image-column", "picture", "--id-column", "uid"), ["a", "b"]),
                        ((llava, "--image-root", folder), ["a.png", "b.png"])]:
        got = run(*args)
        assert [row["image"] for row in got["per_image"]] == names
        assert got["psnr"] == pytest.approx(want["psnr"], rel=1e-6)  # the same pixels, however they were held
    # a store encoded from a shard or a table finds its originals again (member / row), bytes checked
    for k, args in enumerate([(shard,), (table, "--image-column", "picture"),
                              (table, "--image-column", "picture", "--id-column", "uid")]):
        store = tmp_path / f"codes{k}"
        r = CliRunner().invoke(app, ["encode", *map(str, args), "--out", str(store), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        got = run(store)
        assert got["psnr"] == pytest.approx(want["psnr"], rel=1e-6), k
    write_shard({"a": data["a"] + b"more", "b": data["b"]})  # the same pixels, other bytes: not the original
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "codes0"), "--device", "cpu", "--json"])
    assert r.exit_code == 1
    (failure,) = json.loads(r.stdout)["failures"]
    assert failure["source"].endswith("shard-000000.tar#a.png") and "changed since it was encoded" in failure["reason"]
