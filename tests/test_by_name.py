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


def test_error_line_keeps_a_long_path_and_the_command_whole(tmp_path):
    """stderr to a file (rich would assume 80 columns): the path and the suggested command are unbroken."""
    models = tmp_path / ("a-models-directory-with-a-long-name-" * 3) / "models"
    models.mkdir(parents=True)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(imgs / "x.png")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "viqctl", "encode", str(imgs), "--model", "viq-64k",
                            "--out", str(tmp_path / "codes")], stdout=subprocess.DEVNULL, stderr=f, text=True,
                           env=dict(os.environ, VIQ_MODELS_DIR=str(models), HF_HUB_OFFLINE="1", COLUMNS="80"),
                           timeout=300)
    assert p.returncode == 2
    text = log.read_text()
    line = next(ln for ln in text.splitlines() if "viq-64k" in ln)
    assert len(line) > 200 and text.count("\n") == 1  # one line, longer than any terminal width
    assert f"`viqctl download viq-64k --dir {models}`" in line  # the whole command, in one pair of backticks
    assert not (tmp_path / "codes").exists()  # refused before any work
