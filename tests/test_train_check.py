"""benchmarks/train_check.py (the GPU back-end check) and offline_attention.py in tiny CPU mode, so
both are ready the moment a GPU is lent. Step counts are asserted; timings never are."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_check_counts_one_optimizer_step_per_accumulation(tmp_path):
    res = _load("train_check").main(["--tiny", "--out", str(tmp_path / "t.json")])
    plain = res["plain"]
    assert plain["status"] == "ok" and plain["correct"], plain
    assert (plain["optimizer_steps_counted"], plain["backward_passes"]) == (3, 6)
    for kind in ("deepspeed_zero1", "fsdp2"):  # CPU: said why, never silently passed
        assert res[kind]["status"] == "skipped" and "GPU" in res[kind]["reason"]
    assert (tmp_path / "t.json").is_file()


def test_offline_attention_modes_agree():
    res = _load("offline_attention").measure(rows=2, length=64, sample=16, hidden=32, layers=1, heads=2, repeats=1)
    assert set(res["tokens_per_s"]) >= {"sdpa", "varlen_sdpa"} and res["samples_packed"] > 2
    assert res["max_abs_diff_vs_sdpa"]["varlen_sdpa"] < 1e-5


def test_isolated_run_is_a_fresh_one_process_world(tmp_path):
    """What DeepSpeed / FSDP2 get on a GPU: their own process, a one-process distributed world set up by
    environment variables (here on CPU the plain back end, so gloo: MULTI_CPU), and the steps counted there."""
    mod = _load("train_check")
    res = mod.run_isolated("plain", mod.make_world(tmp_path))
    assert res["status"] == "ok" and res["correct"], res
    assert res["distributed_type"] == "MULTI_CPU" and res["optimizer_steps_counted"] == 3
