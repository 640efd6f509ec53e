"""Honest timing: device syncs around every step, ABBA order, peak memory, the machine it ran on."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from typing import Optional

import torch

from viq.bench.config import flash_version


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, dtype: str, attn: str) -> dict:
    import transformers

    info = {"device": device, "device_name": _cpu_name(), "dtype": dtype,
            "attn_implementation": attn, "torch": torch.__version__, "transformers": transformers.__version__,
            "flash_attn": flash_version(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["device_memory_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return info


def stats(times: list[float]) -> dict:
    """Median and spread of step times (seconds)."""
    med = statistics.median(times)
    q1, q3 = (statistics.quantiles(times, n=4, method="inclusive")[i] for i in (0, 2)) if len(times) > 1 else (med, med)
    return {"times_s": [round(t, 6) for t in times], "median_s": med, "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "std_s": statistics.pstdev(times), "iqr_s": q3 - q1}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _rss_bytes() -> Optional[int]:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or on CPU the peak RSS sampled every 2 ms."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "cpu_peak_rss"
        self.peak: Optional[int] = None
        self.before: Optional[int] = None  # resident at the start: weights, optimizer state, data

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
            self.before = torch.cuda.memory_allocated(torch.device(self.device))
            return self
        self._stop = threading.Event()
        self.peak = self.before = _rss_bytes()

        def sample():
            while not self._stop.wait(0.002):
                r = _rss_bytes()
                if r is not None and (self.peak is None or r > self.peak):
                    self.peak = r

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            self.peak = torch.cuda.max_memory_allocated(torch.device(self.device))
        else:
            self._stop.set()
            self._thread.join()
            r = _rss_bytes()
            if r is not None and (self.peak is None or r > self.peak):
                self.peak = r


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def oom_types() -> tuple:
    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(t for t in types if t is not None) or (RuntimeError,)


def time_pair(fns: dict, device: str, warmup: int, repeats: int, tick=None) -> dict:
    """Time ``fns`` (name -> callable) alternately: warm-up rounds, then ABBA-ordered timed rounds.

    Returns name -> {"times": [...], "peak": bytes or None}. Every step is bracketed by device syncs.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            sync(device)
            if tick:
                tick()
    out = {n: {"times": [], "peak": None, "before": None} for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            with PeakMemory(device) as mem:
                sync(device)
                t0 = time.perf_counter()
                fns[n]()
                sync(device)
                dt = time.perf_counter() - t0
            out[n]["times"].append(dt)
            if mem.peak is not None:
                out[n]["peak"] = max(out[n]["peak"] or 0, mem.peak)
                out[n]["before"] = mem.before
            if tick:
                tick()
    return out
