"""Weights through the Hugging Face cache: `REPO_ID[:SUBFOLDER]`, load_tokenizer(..., subfolder=...),
known names fetched by other HF tools, HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE honoured. A fake
cache layout is built in each test; nothing touches the network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.errors import HubError
from viq.hf_cache import hub_cache_path, parse_repo_ref
from viq.hub import resolve_model
from viq.tokenizer import load_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_snapshot(cache: Path, repo_id: str, revision: str = "main") -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """huggingface_hub pointed at an empty temp cache, offline (its constants are read at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_parse_repo_ref():
    assert parse_repo_ref("XuminYu/ViQ_weights:converted_16k") == ("XuminYu/ViQ_weights", None, "converted_16k")
    assert parse_repo_ref("org/repo@v1.0:sub/dir") == ("org/repo", "v1.0", "sub/dir")
    assert parse_repo_ref("org/repo") == ("org/repo", None, None)
    for bad in ["viq-16k", "a/b/c", "org/repo:../x", "/abs/path", "./rel/x"]:
        assert parse_repo_ref(bad) is None


def test_load_tokenizer_from_the_cache_with_a_subfolder(hub_env):
    snap = fake_snapshot(hub_env, "someone/ViQ_weights")
    random_model_dir(snap / "converted_tiny", tiny_config("16k"), seed=0)
    tok = load_tokenizer("someone/ViQ_weights", subfolder="converted_tiny", parts=("encoder",), device="cpu")
    assert Path(tok.source) == snap / "converted_tiny" and tok.levels == [8, 8, 8, 6, 5]
    assert resolve_model("someone/ViQ_weights:converted_tiny") == snap / "converted_tiny"


def test_offline_and_not_cached_says_how_to_get_it(hub_env):
    with pytest.raises(HubError, match="offline") as e:
        hub_cache_path("someone/absent", subfolder="converted_16k")
    assert "hf download someone/absent --include 'converted_16k/*'" in str(e.value)
    snap = fake_snapshot(hub_env, "someone/partial")
    (snap / "other").mkdir()
    (snap / "other" / "x.json").write_text("{}")
    with pytest.raises(HubError, match="not in the Hugging Face cache"):  # the subfolder was never fetched
        resolve_model("someone/partial:converted_16k")


def test_known_name_fetched_by_another_tool_is_reused(hub_env, tmp_path):
    snap = fake_snapshot(hub_env, "XuminYu/ViQ_weights")
    target = snap / "ViQ" / "converted_16k"
    target.mkdir(parents=True)
    for name in ["model_viq_fsq_16k.pth", "embedder.pth", "index_drawer.pth"]:
        (target / name).write_bytes(b"x")
    empty_models_dir = tmp_path / "models"
    assert resolve_model("viq-16k", empty_models_dir) == target
    (target / "embedder.pth").unlink()  # incomplete in the cache: still "not downloaded"
    with pytest.raises(HubError, match="not downloaded"):
        resolve_model("viq-16k", empty_models_dir)


@pytest.mark.parametrize("var", ["HF_HOME", "HF_HUB_CACHE"])
def test_cli_model_repo_id_honours_hf_env(tmp_path, var):
    cache = tmp_path / "home" / "hub" if var == "HF_HOME" else tmp_path / "hubcache"
    snap = fake_snapshot(cache, "someone/ViQ_weights")
    random_model_dir(snap / "converted_tiny", tiny_config("16k"), seed=0)
    img = tmp_path / "a.png"
    Image.fromarray(np.full((32, 48, 3), 100, np.uint8)).save(img)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({var: str(tmp_path / "home" if var == "HF_HOME" else cache), "HF_HUB_OFFLINE": "1"})
    p = subprocess.run([sys.executable, "-m", "viqctl", "encode", str(img), "--model", "someone/ViQ_weights:converted_tiny",
                        "--out", str(tmp_path / "store"), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert Path(manifest["model"]["source"]) == snap / "converted_tiny"
    p = subprocess.run([sys.executable, "-m", "viqctl", "encode", str(img), "--model", "someone/other:converted_tiny",
                        "--out", str(tmp_path / "store2")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "offline" in p.stderr and "Traceback" not in p.stderr
