"""encode / reconstruct / embed as commands: exit codes, resume after a kill, changed files, bad inputs,
two processes, and refusing the wrong model. Calls run in this process; the kill and the two processes
are real ones (python -m viqctl)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import viqctl_in_process
from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.store import CodeStore

EXAMPLES = Path(__file__).resolve().parents[1] / "viq" / "assets" / "examples"
VIQCTL = [sys.executable, "-m", "viqctl"]


def run(*args, check=None):
    """One viqctl call, in this process (kills, pipes and a second process below use real ones)."""
    p = viqctl_in_process(*args)
    if check is not None:
        assert p.returncode == check, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_model_dir(d, tiny_config("16k"), seed=0)
    return d


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for f in EXAMPLES.glob("*.jpg"):
        shutil.copy(f, d / f.name)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24), (17, 70), (64, 64), (100, 31), (16, 16), (33, 48)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"r{i}.png")
    return d


def records(store):
    s = CodeStore(store)
    return {i: (s.get(i).codes.copy(), s.get(i).sha256, s.get(i).width, s.get(i).height) for i in s.ids()}


def test_encode_reconstruct_embed_round_trip(model, images, tmp_path):
    store = tmp_path / "store"
    p = run("encode", images, "--model", model, "--out", store, "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["encoded"] == 9 and summary["failed"] == 0
    assert "RANDOM weights" in p.stderr
    s = CodeStore(store)
    assert len(s) == 9 and s.manifest["model"]["levels"] == [8, 8, 8, 6, 5]
    rec = s.get("r3.png")
    assert rec.codes.shape == (2, 7, 4) and (rec.width, rec.height) == (100, 31)
    import pyarrow.parquet as pq

    shard = next(store.glob("shard-*.parquet"))
    assert str(pq.read_table(shard).schema.field("codes").type.value_type) == "uint16"

    out = tmp_path / "recon"
    run("reconstruct", store, "--out", out, "--ids", "r3.png,r4.png", check=0)
    assert sorted(x.name for x in out.iterdir()) == ["r3.png", "r4.png"]
    img = Image.open(out / "r3.png")
    assert img.size == (100, 31) and img.mode == "RGB"
    run("reconstruct", store, "--out", tmp_path / "padded", "--ids", "r3.png", "--keep-padding", check=0)
    assert Image.open(tmp_path / "padded" / "r3.png").size == (112, 32)
    assert len(list((tmp_path / "padded").iterdir())) == 1

    feats = tmp_path / "f.safetensors"
    run("embed", store, "--out", feats, check=0)
    from safetensors import safe_open

    with safe_open(str(feats), "pt") as f:
        assert f.get_tensor("r3.png").shape == (14, 64)
        assert json.loads(f.metadata()["grids"])["r3.png"] == [2, 7]


def test_bad_inputs_never_stop_the_run(model, images, tmp_path):
    (images / "empty.png").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    good = (images / "r0.png").read_bytes()
    (images / "trunc.png").write_bytes(good[: len(good) // 2])
    from test_images import png_header_only

    (images / "bomb.png").write_bytes(png_header_only(100000, 50000))
    listing = tmp_path / "more.txt"  # a list file naming a file that is not there
    listing.write_text("gone.png\n")
    store = tmp_path / "store"
    p = run("encode", images, listing, "--model", model, "--out", store, "--json", check=1)
    summary = json.loads(p.stdout)
    assert summary["encoded"] == 9 and summary["failed"] == 5
    reasons = {f["id"]: f["reason"] for f in summary["failures"]}
    for name, why in [("empty.png", "empty"), ("text.jpg", "not an image"), ("trunc.png", ""),
                      ("bomb.png", "decompression bomb"), ("gone.png", "cannot read")]:
        assert name in reasons[name] and why in reasons[name], reasons[name]  # one line naming file and reason
    listed = [json.loads(line)["id"] for line in (store / "failures.jsonl").read_text().splitlines()]
    assert sorted(listed) == ["bomb.png", "empty.png", "gone.png", "text.jpg", "trunc.png"]


def test_usage_errors_exit_2(model, images, tmp_path):
    p = run("encode", tmp_path / "missing", "--model", model, "--out", tmp_path / "s", check=2)
    assert "missing" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run("encode", tmp_path / "empty", "--model", model, "--out", tmp_path / "s", check=2)
    assert "holds no image files" in p.stderr
    p = run("encode", images, "--model", tmp_path / "nomodel", "--out", tmp_path / "s", check=2)
    assert "nomodel" in p.stderr
    p = run("encode", images, "--model", model, "--out", tmp_path / "s", "--device", "gpu", check=2)
    assert "unknown device 'gpu'" in p.stderr and "Traceback" not in p.stderr
    if not torch.cuda.is_available():
        p = run("encode", images, "--model", model, "--out", tmp_path / "s", "--device", "cuda", check=2)
        assert "CUDA is not available" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s").exists()  # nothing written by a run that could not start


def test_resume_after_kill_equals_uninterrupted_run(model, images, tmp_path):
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"k{i:02d}.png")
    full = tmp_path / "full"
    run("encode", images, "--model", model, "--out", full, "--token-budget", "16", "--rows-per-shard", "2", check=0)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*VIQCTL, "encode", str(images), "--model", str(model), "--out", str(killed),
                             "--token-budget", "16", "--rows-per-shard", "2", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard-*.parquet"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(killed.glob("shard-*.parquet")))
    assert partial >= 3
    # every shard left behind is whole
    import pyarrow.parquet as pq

    for shard in killed.glob("shard-*.parquet"):
        pq.read_table(shard)
    p = run("encode", images, "--model", model, "--out", killed, "--token-budget", "16",
            "--rows-per-shard", "2", "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["skipped"] >= 2 * min(partial, 3) and summary["encoded"] + summary["skipped"] == 49
    a, b = records(full), records(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and a[k][1:] == b[k][1:]


def test_one_store_one_precision(model, images, tmp_path):
    store = tmp_path / "store"
    run("encode", images, "--model", model, "--out", store, "--dtype", "float32", check=0)
    p = run("encode", images, "--model", model, "--out", store, "--dtype", "bfloat16", check=2)
    assert "compute dtype: float32 != bfloat16" in p.stderr


def test_changed_file_is_encoded_again(model, images, tmp_path):
    store = tmp_path / "store"
    run("encode", images, "--model", model, "--out", store, check=0)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(images / "r0.png")
    p = run("encode", images, "--model", model, "--out", store, "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["encoded"] == 1 and summary["skipped"] == 8
    rec = CodeStore(store).get("r0.png")
    assert (rec.width, rec.height) == (32, 32) and len(CodeStore(store)) == 9


def test_reconstruct_refuses_another_model(model, images, tmp_path):
    store = tmp_path / "store"
    run("encode", images, "--model", model, "--out", store, check=0)
    other = tmp_path / "other"
    random_model_dir(other, tiny_config("16k"), seed=1)
    p = run("reconstruct", store, "--out", tmp_path / "r", "--model", other, check=2)
    assert "another model" in p.stderr
    other64 = tmp_path / "other64"
    random_model_dir(other64, tiny_config("64k"), seed=0)
    p = run("embed", store, "--out", tmp_path / "f.safetensors", "--model", other64, check=2)
    assert "FSQ levels" in p.stderr


def test_two_processes_give_the_same_codes_as_one(model, images, tmp_path):
    one = tmp_path / "one"
    run("encode", images, "--model", model, "--out", one, check=0)
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as sock:  # a free port: parallel runs must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "viqctl", "encode", str(images), "--model", str(model), "--out", str(two), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["encoded"] == 9
    shards = sorted(x.name for x in two.glob("shard-*.parquet"))
    assert any("r00000" in s for s in shards) and any("r00001" in s for s in shards)
    a, b = records(one), records(two)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k][0], b[k][0])
