"""Counting a model's FLOPs and measuring the machine's matmul rate, for utilisation figures.

Benchmarks report achieved FLOP/s against a matmul timed in the same run (so a regression shows on
any machine) and, on GPUs with a known peak, model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

#: Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H100": 756e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """The data-sheet bf16 peak of a GPU by name (longest matching key), or None when unknown."""
    hits = [k for k in GPU_PEAK_BF16 if k.lower() in device_name.lower()]
    return GPU_PEAK_BF16[max(hits, key=len)] if hits else None


def _sdpa_formula(q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:  # torch counts the CUDA kernels but not the CPU one
        mapping[cpu_sdpa] = _sdpa_formula
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops_per_s(device="cpu", dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """The rate of an n x n x n matmul on this device and dtype (best of repeats over ~``seconds``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    best = float("inf")
    end = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * n ** 3 / best
