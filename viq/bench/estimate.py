"""A rough run time, said before a bench starts: FLOPs per step over a quick matmul speed probe.

Only for telling the user what they are in for (a factor of two either way is fine); the measured
numbers never depend on it. ``EFFICIENCY`` is the share of the probe's matmul speed that whole
training steps reach: CPU from the default run on a busy 2-core EPYC (5 min, estimated 5.2), CUDA a guess.
"""

from __future__ import annotations

import time

import torch

from viq.bench.config import QWEN25, BenchConfig, encoder_config
from viq.bench.workload import SeqLayout

EFFICIENCY = {"cpu": 0.8, "cuda": 0.35}
SETUP_S = {"cpu": 8.0, "cuda": 30.0}  # data, encoder and LLM building, first-call overheads


def _llm_flops(name: str, tokens: int, sample_len: int) -> float:
    """Forward FLOPs of a Qwen2.5 of size ``name`` over ``tokens`` packed tokens (per-sample attention)."""
    hidden, ffn, layers, heads, kv, vocab, _ = QWEN25[name]
    kv_dim = hidden // heads * kv
    per_layer = hidden * (2 * hidden + 2 * kv_dim) + 3 * hidden * ffn
    dense = 2 * tokens * (layers * per_layer + hidden * vocab)
    attention = 4 * layers * hidden * tokens * sample_len
    return float(dense + attention)


def _vit_flops(cfg: BenchConfig, layout: SeqLayout) -> float:
    """Forward FLOPs of the online encoder's ViT for one sequence's images."""
    v = encoder_config(cfg.encoder).vit
    n = layout.vit_tokens
    per_image = v.depth * (2 * n * (4 * v.width * v.width + 2 * v.width * v.mlp_hidden) + 4 * v.width * n * n)
    return float(per_image * layout.n_images)


def step_flops(cfg: BenchConfig, name: str, layout: SeqLayout, mode: str) -> tuple[float, float]:
    """(online, offline) FLOPs of one step of one configuration."""
    tokens = layout.seq_len * cfg.rows
    llm = _llm_flops(name, tokens, max(1, layout.seq_len // max(1, layout.n_images)))
    if mode == "train":
        llm *= 4.0 if cfg.grad_checkpointing else 3.0  # backward ~2x forward, + a recomputed forward
    vit = _vit_flops(cfg, layout) * cfg.rows * (3.0 if cfg.train_vit and mode == "train" else 1.0)
    return llm + vit, llm


def probe_flops_per_s(device: str, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Matmul throughput of this device right now (the CPU threads already set), in FLOP/s."""
    n = 256 if device == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call: allocations, kernel selection
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(torch.device(device))
    return 2.0 * n ** 3 * done / (time.perf_counter() - start)


def estimate_seconds(cfg: BenchConfig, layouts: list[SeqLayout], flops_per_s: float) -> float:
    """Rough wall time of a resolved config: every step of every configuration, plus set-up."""
    kind = "cuda" if cfg.device.startswith("cuda") else "cpu"
    speed = max(flops_per_s * EFFICIENCY[kind], 1.0)
    steps = cfg.warmup + cfg.repeats
    total = SETUP_S[kind]
    for name in cfg.llms:
        for lay in layouts:
            for mode in cfg.modes:
                online, offline = step_flops(cfg, name, lay, mode)
                total += steps * (online + offline) / speed
    if cfg.include_extraction and layouts:
        total += steps * _vit_flops(cfg, layouts[0]) / speed
    return total
