"""viqctl bench: its mechanics (layouts, identical inputs for both setups, the result schema, the CLI),
never its timings."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import viqctl_in_process
from viq.bench import (QWEN25, BenchConfig, bench_tokenizer, build_batches, encoder_config, parse_seq, parse_size,
                       plan_layout, qwen2_config, run_bench, template_overhead)
from viq.errors import ConfigError
from viq.mllm.model import Projector
from viq.mllm.offline import collate_packed

VIQCTL = [sys.executable, "-m", "viqctl"]
TOKENS = Projector(4, 4).num_tokens
TINY = dict(seq_lens=[256], llms=["tiny"], encoder="tiny", image_size=(64, 64), warmup=0, repeats=1,
            device="cpu", dtype="float32", threads=1)  # 1 thread: fast even on a busy CPU


def test_parse_options():
    assert parse_seq("4k,16k") == [4096, 16384]
    assert parse_seq("256, 1K") == [256, 1024]
    assert parse_size("896") == (896, 896) and parse_size("1024x768") == (1024, 768)
    for bad in ("4m", "", "k"):
        with pytest.raises(ConfigError):
            parse_seq(bad)
    with pytest.raises(ConfigError):
        parse_size("big")
    with pytest.raises(ValueError):
        BenchConfig(image_size="100")  # not a multiple of 16
    with pytest.raises(ValueError):
        BenchConfig(llms=["13b"])


def test_real_qwen25_configs():
    c = qwen2_config("0.5b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (896, 24, 14, 2, 4864, 151936, True)
    c = qwen2_config("7b", max_positions=65536)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.tie_word_embeddings) == (3584, 28, 152064, False)
    assert c.max_position_embeddings == 65536
    assert set(QWEN25) == {"0.5b", "1.5b", "3b", "7b", "tiny"}
    assert encoder_config("giant").vit.width == 1536 and encoder_config("so400m").vit.depth == 27


def test_defaults_follow_the_device():
    cpu = BenchConfig(device="cpu").resolved()
    assert cpu.llms == ["tiny"] and cpu.encoder == "tiny" and cpu.seq_lens == [1024, 2048, 4096]
    assert cpu.dtype == "float32" and cpu.attn == "varlen_sdpa" and cpu.image_size == (448, 448)
    kept = BenchConfig(device="cpu", seq_lens=[512], llms=["0.5b"]).resolved()
    assert kept.seq_lens == [512] and kept.llms == ["0.5b"]


def test_layout_fills_the_sequence_exactly():
    oh = template_overhead(bench_tokenizer())
    lay = plan_layout(4096, (896, 896), TOKENS, oh)
    assert lay.grid == (56, 56) and lay.image_tokens == 28 * 29 + 2 == 814 and lay.n_images == 2
    assert lay.n_images * (lay.image_tokens + oh) + sum(lay.text_per_sample) == 4096
    lay = plan_layout(3000, (1024, 768), TOKENS, oh, n_images=3)
    assert lay.grid == (48, 64) and lay.n_images == 3
    with pytest.raises(ConfigError, match="do not fit"):
        plan_layout(1024, (896, 896), TOKENS, oh, n_images=2)


@pytest.mark.parametrize("seq,size,n", [(256, (64, 64), None), (300, (96, 64), 2), (512, (128, 128), 3)])
def test_both_setups_get_identical_packed_batches(tmp_path, seq, size, n):
    cfg = encoder_config("tiny")
    lay = plan_layout(seq, size, TOKENS, template_overhead(bench_tokenizer()), n)
    rows, report = build_batches(tmp_path, lay, 2, cfg.head.levels, TOKENS)
    assert len(rows) == 2 and report["store_read_s_per_image"] >= 0
    for r in rows:
        assert r.length == seq and r.n_pad == 0
        assert len(r.grids) == lay.n_images and r.n_image_tokens == lay.n_images * lay.image_tokens
        assert all(c.shape == (*lay.grid, 4) for c in r.images)  # codes read back from the store
    pixels = [torch.zeros(3, size[1], size[0]) for r in rows for _ in r.grids]
    off, on = collate_packed(rows), collate_packed(rows, images=pixels)
    for name in ("input_ids", "labels", "position_ids", "image_mask"):
        assert torch.equal(getattr(off, name), getattr(on, name))
    assert off.grids == on.grids and off.segments == on.segments


EXPECTED_RUN = {"llm": str, "seq_len": int, "mode": str, "encoder": str, "rows": int, "images_per_seq": int,
                "image_size": list, "vit_tokens_per_image": int, "llm_tokens_per_image": int, "status": str,
                "tokens_per_step": int, "image_tokens_per_step": int, "text_tokens_per_step": int,
                "pad_tokens_per_step": int, "supervised_tokens_per_step": int, "same_inputs": bool,
                "online": dict, "offline": dict, "speedup": float, "ratio": float, "llm_params": int,
                "trainable_params": int, "vit_params": int, "embedder_params": int,
                "store_read_s_per_image": float, "break_even_epochs": (float, type(None))}
EXPECTED_SETUP = {"times_s": list, "median_s": float, "mean_s": float, "min_s": float, "max_s": float,
                  "std_s": float, "iqr_s": float, "tokens_per_s": float, "peak_mem_bytes": int,
                  "mem_before_bytes": int, "mem_kind": str,
                  "loss": float}
EXPECTED_MACHINE = {"device": str, "device_name": str, "dtype": str, "attn_implementation": str, "torch": str,
                    "transformers": str, "python": str, "platform": str, "cpu_threads": int}


def check_schema(d, modes=("forward", "train"), extraction=False):
    assert d["schema"] == "viq-bench v1"
    for k, t in EXPECTED_MACHINE.items():
        assert isinstance(d["machine"][k], t), k
    assert d["config"]["device"] == "cpu" and d["config"]["seq_lens"] == [256]
    assert [r["mode"] for r in d["runs"]] == list(modes)
    for r in d["runs"]:
        assert set(r) == set(EXPECTED_RUN)
        for k, t in EXPECTED_RUN.items():
            assert isinstance(r[k], t), (k, r[k])
        assert r["status"] == "ok" and r["same_inputs"] and r["tokens_per_step"] == 256
        for setup in ("online", "offline"):
            assert set(r[setup]) == set(EXPECTED_SETUP)
            for k, t in EXPECTED_SETUP.items():
                assert isinstance(r[setup][k], t), (setup, k)
        on, off = r["online"]["median_s"], r["offline"]["median_s"]
        assert r["speedup"] == pytest.approx((on - off) / on) and r["ratio"] == pytest.approx(on / off)
    if extraction:
        ex = d["extraction"]
        assert ex["images_per_call"] >= 1 and ex["per_image"]["median_s"] > 0 and ex["images_per_s"] > 0
    else:
        assert d["extraction"] is None


def test_run_bench_result_schema(tmp_path):
    seen = []
    res = run_bench(BenchConfig(**TINY, modes=["train"], workdir=str(tmp_path / "work")),
                    lambda label, done, total: seen.append((done, total)))
    d = json.loads(res.to_json())
    check_schema(d, modes=("train",))
    assert seen[-1][0] == seen[-1][1]  # the progress reached its total
    assert (tmp_path / "work" / "seq256" / "codes" / "manifest.json").is_file()  # a real code store


def test_cli_end_to_end_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "fig.png"
    p = viqctl_in_process("bench", "--seq", "256", "--llm", "tiny", "--encoder", "tiny", "--image-size", "64",
                          "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
                          "--include-extraction", "--json", "--plot", plot)
    assert p.returncode == 0, p.stdout + p.stderr
    check_schema(json.loads(p.stdout), extraction=True)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_and_usage_errors():
    p = viqctl_in_process("bench", "--seq", "256", "--image-size", "64", "--repeats", "1", "--warmup", "0",
                          "--device", "cpu", "--threads", "1", "--mode", "forward", env={"COLUMNS": "200"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "speed-up" in p.stdout and "tiny" in p.stdout
    p = viqctl_in_process("bench", "--mode", "sideways")
    assert p.returncode == 2 and "sideways" in p.stderr
    p = viqctl_in_process("bench", "--seq", "128", "--images-per-seq", "4", "--device", "cpu")
    assert p.returncode == 2 and "do not fit" in p.stderr


def test_cpu_defaults_use_one_thread_and_the_plan_says_what_runs():
    from viq.bench import plan_bench

    cfg = BenchConfig(device="cpu").resolved()
    assert cfg.threads == 1 and cfg.repeats == 5 and cfg.warmup == 1  # what README and --help state
    assert BenchConfig(device="cpu", threads=2).resolved().threads == 2
    plan = plan_bench(BenchConfig(device="cpu", seq_lens=parse_seq("16k,16000")))
    assert [s for _, s, _ in plan.configurations] == [16384, 16384, 16000, 16000]
    assert plan.steps == 4 * 2 * (1 + 5) and plan.estimate_s > 0
    small = plan_bench(BenchConfig(**{**TINY, "repeats": 5}))
    assert 0 < small.estimate_s < plan.estimate_s


def test_usage_errors_are_one_line_naming_the_option():
    for args, words in ((["--repeats", "0"], "--repeats 0"), (["--llm", "huge"], "--llm huge"),
                        (["--seq", "16m"], "16m")):
        p = viqctl_in_process("bench", *args)
        assert p.returncode == 2 and words in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "pydantic" not in p.stderr and not p.stdout


def test_an_interrupted_run_keeps_what_finished(tmp_path, monkeypatch):
    import viq.bench.run as run_mod

    real, calls = run_mod.time_pair, []

    def stop_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "time_pair", stop_on_second)
    seen = []
    res = run_bench(BenchConfig(**{**TINY, "seq_lens": [256, 320]}, modes=["forward"]), on_run=seen.append)
    assert res.interrupted and [r["seq_len"] for r in res.runs] == [256] and seen == res.runs
    assert res.to_dict()["interrupted"] is True


def test_cli_ctrl_c_prints_the_finished_configurations(tmp_path):
    """SIGINT after the first configuration's line: exit 130, that configuration in the JSON."""
    import signal
    import time

    args = ["bench", "--seq", "256,256,256,256,256,256", "--llm", "tiny", "--encoder", "tiny", "--image-size",
            "64", "--repeats", "3", "--warmup", "0", "--device", "cpu", "--mode", "forward", "--json"]
    p = subprocess.Popen([*VIQCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 240
    for line in p.stderr:  # a line per finished configuration, since stderr is a pipe
        lines.append(line)
        if line.startswith("[1/6]") or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    stdout, rest = p.communicate(timeout=120)
    text = "".join(lines) + rest
    assert p.returncode == 130, text
    assert lines[0].startswith("bench on cpu") and "1 CPU thread" in lines[0]
    assert lines[1].startswith("plan: 6 configuration(s)") and "rough estimate" in lines[1]
    data = json.loads(stdout)
    assert data["interrupted"] is True and 1 <= len(data["runs"]) < 6
    assert "interrupted" in rest and "finished" in rest
