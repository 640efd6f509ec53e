"""Encoder-only loads (what producing codes needs) build no drawer and never import diffusers."""

import subprocess
import sys
import textwrap

import torch

from viq.config import preset_config
from viq.model.viq_model import ViQModel
from viq.weights.save import export_reference

SCRIPT = textwrap.dedent("""
    import sys
    from viq.tokenizer import load_tokenizer
    tok = load_tokenizer(sys.argv[1], parts=("encoder",))
    print(sorted(n for n, _ in tok.model.named_children()), "diffusers" in sys.modules)
""")


def test_reference_layout_encoder_load_imports_no_diffusers(tmp_path):
    cfg = preset_config("tiny", "16k")
    torch.manual_seed(0)
    export_reference(ViQModel(cfg).state_dict(), cfg, tmp_path, "16k")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[-2] == "['head', 'vit'] False"


def test_encoder_only_model_has_no_drawer():
    model = ViQModel(preset_config("tiny", "16k"), parts=("encoder",))
    assert not any(k.startswith(("drawer.", "head.post_mlps.")) for k in model.state_dict())
