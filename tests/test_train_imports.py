"""Inference never imports training code: viq/weights, viq/model, viq/nn, viq/quant and viq/tokenizer.py
load, build and run a tokenizer without ``viq.train`` in ``sys.modules``."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ["viq/weights", "viq/model", "viq/nn", "viq/quant", "viq/tokenizer.py"]
#: no exception: a training step checkpoint reaches convert through a reader the caller passes.
ALLOWED: set = set()


def inference_files():
    for entry in INFERENCE:
        p = ROOT / entry
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def train_imports(path: Path):
    """(module imported, at module level?) for every import of viq.train in a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n == "viq.train" or n.startswith("viq.train."):
                yield n, id(node) in top
                break


def test_no_inference_module_imports_training_code():
    found = []
    for f in inference_files():
        rel = str(f.relative_to(ROOT))
        for module, top_level in train_imports(f):
            if top_level or (rel, module) not in ALLOWED:
                found.append(f"{rel}: {module}")
    assert not found, found


def test_loading_and_running_a_tokenizer_leaves_viq_train_unimported(tmp_path):
    code = f"""
import importlib, pkgutil, sys, torch
import viq
for pkg in ("viq.weights", "viq.model", "viq.nn", "viq.quant"):
    p = importlib.import_module(pkg)
    for m in pkgutil.iter_modules(p.__path__):
        importlib.import_module(f"{{pkg}}.{{m.name}}")
import viq.tokenizer
from viq.config import tiny_config
from viq.demo import random_model_dir
from viq.tokenizer import load_tokenizer
random_model_dir({str(tmp_path / 'm')!r}, tiny_config("16k"), seed=0)
tok = load_tokenizer({str(tmp_path / 'm')!r}, device="cpu")
codes = tok.encode_pixels([torch.zeros(3, 32, 32)])
tok.embed(codes)
bad = sorted(m for m in sys.modules if m == "viq.train" or m.startswith("viq.train."))
print("TRAIN:", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRAIN: []" in out.stdout, out.stdout[-2000:]
