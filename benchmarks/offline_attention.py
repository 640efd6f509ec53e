"""Offline MLLM stage: attention per packed sample vs one block-diagonal mask, tokens/s in one process.

    python benchmarks/offline_attention.py                                  # CPU default (~1 min)
    python benchmarks/offline_attention.py --rows 4 --length 4096 --hidden 896 --layers 4 --device cuda

The offline stage packs R rows of L positions into ONE sequence of R*L (``viq.mllm.offline``).
``llm.attention: sdpa`` lets transformers build a causal block-diagonal mask over all R*L
positions from the restarting ``position_ids`` (O((R*L)^2) work); ``varlen_sdpa`` runs SDPA per
packed sample (O(sum l_i^2), what flash-attention's varlen kernel does); ``flash_attention_2`` is
measured too when flash-attn and a GPU are there. Random Qwen2 weights (timing does not depend on
the values); forward + backward of the decoder on the same packed batch, alternately, median of
``--repeats``. Prints JSON: tokens/s per mode, the ratio to ``sdpa``, and the largest difference
of the hidden states (the modes must agree).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch


def packed_segments(rows: int, length: int, mean: int, gen: torch.Generator) -> list[int]:
    """Sample lengths around ``mean`` filling each row; the rest of a row is one padding segment."""
    segs = []
    for _ in range(rows):
        used = 0
        while True:
            n = int(torch.randint(mean // 2, mean * 3 // 2 + 1, (1,), generator=gen))
            if used + n > length:
                break
            segs.append(n)
            used += n
        if used < length:
            segs.append(length - used)
    return segs


def measure(rows: int = 4, length: int = 1024, sample: int = 128, hidden: int = 128, layers: int = 2,
            heads: int = 4, repeats: int = 5, device: str = "cpu", dtype=None) -> dict:
    """Forward + backward of a random Qwen2 decoder on one packed batch in each attention mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from viq.mllm.varlen_attention import VARLEN_SDPA, cu_seqlens, register_varlen_sdpa

    register_varlen_sdpa()
    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=length)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dev, dtype).get_decoder()
    gen = torch.Generator().manual_seed(1)
    segs = packed_segments(rows, length, sample, gen)
    pos = torch.cat([torch.arange(n) for n in segs])[None].to(dev)
    embeds = torch.randn(1, rows * length, hidden, generator=gen).to(dev, dtype)

    modes = {"sdpa": ("sdpa", {}), "varlen_sdpa": (VARLEN_SDPA, {"cu_seq_lens_q": cu_seqlens(segs, "cpu")})}
    if dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        cu = cu_seqlens(segs, dev)
        modes["flash_attention_2"] = ("flash_attention_2", dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                                max_length_q=max(segs), max_length_k=max(segs)))

    def run(mode: str, backward: bool = True):
        impl, kwargs = modes[mode]
        model.config._attn_implementation = impl
        x = embeds.clone().requires_grad_(backward)
        h = model(inputs_embeds=x, position_ids=pos, use_cache=False, **kwargs).last_hidden_state
        if backward:
            h.float().square().mean().backward()
        return h.detach()

    ref = run("sdpa", backward=False)
    diffs = {m: float((run(m, backward=False).float() - ref.float()).abs().max()) for m in modes}
    times = {m: [] for m in modes}
    for m in modes:  # warm-up
        run(m)
    for _ in range(repeats):
        for m in modes:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            run(m)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    n = rows * length
    tps = {m: n / statistics.median(v) for m, v in times.items()}
    return {"device": str(dev), "dtype": str(dtype).removeprefix("torch."), "rows": rows, "length": length,
            "samples_packed": len(segs), "hidden": hidden, "layers": layers, "repeats": repeats,
            "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
            "ratio_vs_block_diagonal_sdpa": {m: round(v / tps["sdpa"], 3) for m, v in tps.items()},
            "max_abs_diff_vs_sdpa": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--sample", type=int, default=128, help="mean packed sample length")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    res = measure(a.rows, a.length, a.sample, a.hidden, a.layers, a.heads, a.repeats, a.device,
                  getattr(torch, a.dtype) if a.dtype else None)
    res["load_average"] = list(os.getloadavg())
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
