"""Weights registered with `viqctl download --import` are found by name by encode and reconstruct."""

import json
import os
import subprocess
import sys

from conftest import reference_dir_with_config


def test_import_then_encode_and_reconstruct_by_name(tmp_path):
    ref = reference_dir_with_config(tmp_path, "16k")
    models = tmp_path / "models"
    env = dict(os.environ, VIQ_MODELS_DIR=str(models), HF_HUB_OFFLINE="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "viqctl", *map(str, a)], capture_output=True, text=True,
                                    env=env, timeout=300)
    p = run("download", "--import", ref, "--name", "viq-16k")
    assert p.returncode == 0, p.stderr
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(imgs / "red.png")
    p = run("encode", imgs, "--model", "viq-16k", "--out", tmp_path / "codes", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["encoded"] == 1
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["model"]["levels"] == [8, 8, 8, 6, 5]
    p = run("reconstruct", tmp_path / "codes", "--out", tmp_path / "recon")
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "recon" / "red.png").size == (40, 30)
    p = run("encode", imgs, "--model", "viq-64k", "--out", tmp_path / "c2")
    assert p.returncode == 2 and "viqctl download viq-64k" in p.stderr
