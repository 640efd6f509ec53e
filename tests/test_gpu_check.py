"""benchmarks/gpu_check.py in --tiny mode on CPU: every section runs and the JSON has what the README
table reads, so the prepared GPU check cannot rot before a GPU is lent. No timings are asserted."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_tiny_gpu_check_writes_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sub" / "check.json"
    mod.main(["--tiny", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["schema"] == "viq-gpu-check v1" and data["mode"] == "tiny"
    for name in ("encode_square", "encode_mixed", "encode_pipeline", "attention", "agreement", "bench",
                 "offline_attention", "train_engines"):
        assert data[name].get("status") != "failed", data[name]
    for name in ("encode_square", "encode_mixed"):
        enc = data[name]
        assert enc["images_per_s"] > 0 and enc["model_flops"] > 0 and 0 < enc["fraction_of_measured_matmul"]
    assert data["encode_mixed"]["tokens"] < data["encode_square"]["tokens"]
    pipe = data["encode_pipeline"]
    assert pipe["images"] == 6 and pipe["workers"] == 0 and pipe["pipeline_over_model"] > 0  # CPU: no threads
    att = data["attention"]["backends"]
    assert att["loop"]["max_abs_diff_vs_loop"] == 0 and "nested" in att
    assert all(b["max_abs_diff_vs_loop"] < 1e-4 for b in att.values())
    assert 0 < data["agreement"]["identical_fraction"] <= 1
    modes = {(r["mode"], r["status"]) for r in data["bench"]["summary"]}
    assert modes == {("forward", "ok"), ("train", "ok")}
    assert data["machine"]["matmul_flops_per_s"] > 0
    assert data["offline_attention"]["max_abs_diff_vs_sdpa"]["varlen_sdpa"] < 1e-5
    engines = data["train_engines"]
    assert engines["plain"]["correct"] and engines["fsdp2"]["status"] == "skipped"  # CPU: said why


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_encoder_is_what_load_leaves():
    """bf16 weights, the head's RoPE table float32 on the model's device (``.to(dtype)`` alone rounds it
    to bf16, and a model built under ``torch.device("cuda")`` left it on the CPU)."""
    import torch

    from viq.config import preset_config

    model = _module().random_encoder(preset_config("tiny", "16k"), "cpu", torch.bfloat16)
    assert model.head.rope_freqs.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert {str(t.device) for t in list(model.parameters()) + list(model.buffers())} == {"cpu"}


def test_spent_budget_skips_sections_and_no_cuda_refuses_full_mode(tmp_path):
    import pytest
    import torch

    mod = _module()
    out = tmp_path / "check.json"
    mod.main(["--tiny", "--device", "cpu", "--out", str(out), "--budget-s", "0"])
    data = json.loads(out.read_text())
    assert data["encode_square"]["status"] == "skipped" and data["train_engines"]["status"] == "skipped"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            mod.main(["--out", str(tmp_path / "full.json")])
