"""One prepared GPU check: encode throughput and MFU, the whole encode pipeline against the model
alone, attention backends, bf16 vs fp32 codes, the bench, the offline MLLM stage's attention modes
and the training engine on DeepSpeed / FSDP2.

    python benchmarks/gpu_check.py --out gpu_check.json      # one H100/H200: about 5-8 minutes
    python benchmarks/gpu_check.py --tiny --out tiny.json    # CPU, seconds: what the tests run

Random weights in the published layouts (timing does not depend on the values; nothing is
downloaded). Every section is timed in this process after warm-up, with device synchronisation,
and records its own baseline: MFU against the GPU's data-sheet bf16 peak and against a bf16 matmul
measured in the same run; each attention backend against the exact per-image loop; bf16 codes
against fp32 codes of the same images; offline against online MLLM steps; per-sample attention
against the block-diagonal mask; optimizer steps per accumulation on each distributed back end
(``train_check.py``; DeepSpeed needs ``pip install 'viq[deepspeed]'`` first). A section that fails
(out of memory, a missing kernel) is recorded with its error and the others still run; the JSON is
rewritten after every section (a run killed at its time limit keeps what finished), and a section
that would start after ``--budget-s`` is recorded as skipped. The full check refuses to run on a
CPU unless ``--device cpu`` is given (a CPU-only torch on the GPU machine would otherwise spend the
lease on giant-model encodes). viq need not be installed: the script finds it in its checkout (its
dependencies must be there; the GPU machine's image lacks pydantic, which travels as wheels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if importlib.util.find_spec("viq") is None:  # run from a checkout where viq is not installed (the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(arch="giant", square=1024, mixed=[(256, 256), (512, 512), (640, 480), (1024, 768), (768, 1024),
                                               (1024, 1024), (448, 336), (896, 896)],
            images=32, token_budget=65536, pipeline_images=64, pipeline_min_side=512, agree_images=8, agree_side=512, attn_lens=[1024, 4096, 1200, 256, 3072],
            seq="4k,16k", llm="0.5b,1.5b", encoder="giant", image_size=(896, 896), warmup=1, repeats=3,
            offline_attention=dict(rows=4, length=4096, sample=512, hidden=896, layers=4, heads=14, repeats=5))
TINY = dict(arch="tiny", square=64, mixed=[(32, 32), (48, 32), (64, 48)], images=4, token_budget=256,
            pipeline_images=6, pipeline_min_side=32,
            agree_images=2, agree_side=64, attn_lens=[16, 40, 4], seq="256", llm="tiny", encoder="tiny",
            image_size=(64, 64), warmup=0, repeats=1, skip_backends=["flex"],
            offline_attention=dict(rows=2, length=64, sample=16, hidden=32, layers=1, heads=2, repeats=1))  # flex: a compile, tested elsewhere


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def write_json(results: dict, out: Path) -> None:
    """Atomic write (temp + rename); called after every section so a killed run keeps what finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out)


def section(results: dict, name: str, fn, out: Path | None = None, deadline: float | None = None) -> None:
    """Run one section; record its result or its error, never stop the whole check. A section that
    would start after ``deadline`` (perf_counter time) is recorded as skipped instead."""
    t0 = time.perf_counter()
    if deadline is not None and t0 > deadline:
        results[name] = {"status": "skipped", "reason": "--budget-s spent before this section started"}
        print(f"[gpu_check] {name}: skipped (time budget spent)", file=sys.stderr, flush=True)
        if out is not None:
            write_json(results, out)
        return
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # recorded, so one broken section does not hide the others
        results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "traceback": traceback.format_exc(limit=4)}
        if device_is_cuda():
            torch.cuda.empty_cache()
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {results.setdefault('section_seconds', {})[name]} s", file=sys.stderr, flush=True)
    if out is not None:
        write_json(results, out)


def device_is_cuda() -> bool:
    return torch.cuda.is_available()


def machine(device: str, dtype: torch.dtype) -> dict:
    from viq.nn.flops import gpu_peak_flops, matmul_flops_per_s

    info = {"torch": torch.__version__, "device": device, "dtype": str(dtype).removeprefix("torch.")}
    info.update(attention_kernels())
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        info.update(device_name=name, cuda=torch.version.cuda, peak_bf16_flops=gpu_peak_flops(name),
                    memory_bytes=torch.cuda.get_device_properties(0).total_memory)
        info["matmul_flops_per_s"] = matmul_flops_per_s(device, dtype, n=8192, seconds=2.0)
    else:
        import os

        info.update(device_name="cpu", cpu_threads=torch.get_num_threads(), cpus=os.cpu_count(),
                    peak_bf16_flops=None)
        info["matmul_flops_per_s"] = matmul_flops_per_s(device, dtype, n=512, seconds=0.2)
    return info


def keep_tables_fp32(model, dtype: torch.dtype):
    """Cast the weights to ``dtype`` but keep the head's computed RoPE table in float32, as
    ``load_model`` leaves a loaded model (``.to(dtype)`` alone would round the frequencies to bf16)."""
    head = getattr(model, "head", None)
    freqs = getattr(head, "rope_freqs", None)
    model.to(dtype)
    if freqs is not None:
        head.rope_freqs = freqs.float()
    return model


def random_encoder(cfg, device: str, dtype: torch.dtype):
    """A random-weight encoder as ``load_tokenizer(parts=("encoder",))`` would leave it: weights in
    ``dtype`` on ``device``, built under the device context (fast init on the GPU)."""
    from viq.model.viq_model import ViQModel

    with torch.device(device):
        model = ViQModel(cfg, parts=("encoder",))
    return keep_tables_fp32(model, dtype).eval().requires_grad_(False)


def attention_kernels() -> dict:
    """What the packed attention can use here: flash-attn, and torch's varlen kernel with its signature
    (the ``scale`` argument came after torch 2.10's first version of it)."""
    import importlib.util
    import inspect

    from viq.nn.attention import _torch_varlen

    fn = _torch_varlen()
    return {"flash_attn": importlib.util.find_spec("flash_attn") is not None,
            "torch_varlen_signature": str(inspect.signature(fn)) if fn is not None else None}


def random_images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for w, h in shapes]


def encode_rate(tok, shapes, budget: int, device: str, p: dict, mach: dict) -> dict:
    """images/s and MFU of packed encoding (pixels already preprocessed: the model's own rate)."""
    from viq.nn.flops import count_flops
    from viq.packing import batches_by_budget, tokens_of

    images = [x.to(device) for x in random_images(shapes)]  # preprocessed and on the device: the model alone
    counts = [tokens_of(w, h) for w, h in shapes]
    batches = [[images[i] for i in b] for b in batches_by_budget(counts, budget)]

    def run():
        for b in batches:
            tok.encode_pixels(b)

    from viq.nn.attention import attention_backend

    with attention_backend("loop"):  # every backend computes the same; torch counts SDPA, not flash-attn's kernel
        flops = sum(count_flops(lambda b=b: tok.encode_pixels(b)) for b in batches)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = timed(run, device, p["warmup"] + 1, p["repeats"])
    med = statistics.median(times)
    out = {"images": len(images), "tokens": sum(counts), "batches": len(batches), "token_budget": budget,
           "median_s": med, "times_s": times, "images_per_s": len(images) / med, "tokens_per_s": sum(counts) / med,
           "model_flops": flops, "achieved_flops_per_s": flops / med,
           "fraction_of_measured_matmul": flops / med / mach["matmul_flops_per_s"]}
    if mach.get("peak_bf16_flops"):
        out["mfu"] = flops / med / mach["peak_bf16_flops"]
    if device.startswith("cuda"):
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def encode_pipeline(tok, device: str, p: dict) -> dict:
    """The whole ``encode`` (read, decode in the worker threads, pin, model, Parquet store) against the
    model alone on the same decoded images in the same batches: below 1, the GPU waits on the host."""
    import shutil
    import tempfile

    from viq.encode import EncodeOptions, encode_to_store, resolve_workers
    from viq.sources import collect_sources

    folder = _sibling("encode_folder")
    work = Path(tempfile.mkdtemp(prefix="viq-gpu-pipeline-"))
    try:  # JPEGs of pipeline_min_side..square px, gradients plus noise
        folder.write_folder(work / "images", p["pipeline_images"], p["pipeline_min_side"], p["square"])
        sources = collect_sources([str(work / "images")])
        opts = EncodeOptions(token_budget=p["token_budget"])
        pixels, counts, batches = folder.decoded_batches(sources, tok, opts, opts.token_budget)
        if device.startswith("cuda"):
            pixels = [x.pin_memory() for x in pixels]  # as the pipeline's threads leave them

        def model_only():
            for b in batches:
                tok.encode_pixels([pixels[i] for i in b])

        stores = iter(range(1_000_000))

        def pipeline():
            summary = encode_to_store(sources, tok, work / f"store{next(stores)}", {}, opts)
            assert summary.encoded == len(sources), summary.as_dict()

        model_s = timed(model_only, device, p["warmup"] + 1, p["repeats"])
        pipeline_s = timed(pipeline, device, p["warmup"], p["repeats"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m, q = statistics.median(model_s), statistics.median(pipeline_s)
    return {"images": len(sources), "tokens": sum(counts), "batches": len(batches), "workers": resolve_workers(opts, tok),
            "model_times_s": model_s, "pipeline_times_s": pipeline_s, "model_images_per_s": len(sources) / m,
            "pipeline_images_per_s": len(sources) / q, "pipeline_over_model": m / q}


def attention_backends(device: str, dtype: torch.dtype, cfg, p: dict) -> dict:
    """Every available packed-attention backend on the ViT's head shape, against the exact loop."""
    from viq.nn.attention import Segments, available_backends, packed_attention

    seg = Segments(tuple(p["attn_lens"]))
    heads, hd = cfg.vit.heads, cfg.vit.width // cfg.vit.heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seg.total, heads, hd, generator=g).to(device, dtype) for _ in range(3))
    scale = hd ** -0.5
    ref = packed_attention(q, k, v, seg, scale, backend="loop").float()
    out = {"lengths": list(seg.lengths), "heads": heads, "head_dim": hd, "backends": {}}
    for name in [b for b in available_backends(q) if b not in p.get("skip_backends", ())]:
        try:
            o = packed_attention(q, k, v, seg, scale, backend=name).float()
            times = timed(lambda: packed_attention(q, k, v, seg, scale, backend=name), device, 2, max(3, p["repeats"]))
            out["backends"][name] = {"median_s": statistics.median(times), "max_abs_diff_vs_loop":
                                     float((o - ref).abs().max())}
        except Exception as exc:
            out["backends"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:300]}
    ok = {n: b["median_s"] for n, b in out["backends"].items() if "median_s" in b}
    if ok:
        out["fastest"] = min(ok, key=ok.get)
        out["speedup_vs_loop"] = {n: ok["loop"] / t for n, t in ok.items()} if "loop" in ok else None
    return out


def code_agreement(cfg, device: str, p: dict) -> dict:
    """The same random-weight model in fp32 and bf16 on the same images: fraction of identical codes."""
    from viq.tokenizer import ViQTokenizer

    torch.manual_seed(0)
    model = random_encoder(cfg, device, torch.float32)
    side = p["agree_side"]
    images = random_images([(side, side)] * p["agree_images"], seed=1)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # a true fp32 reference: matmuls and the patch-embedding convolution (cuDNN allows TF32 by default)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = ViQTokenizer(model, cfg).encode_pixels(images)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
    bf16 = ViQTokenizer(keep_tables_fp32(model, torch.bfloat16), cfg).encode_pixels(images)
    same = sum(int((a == b).sum()) for a, b in zip(fp32, bf16))
    total = sum(a.numel() for a in fp32)
    patch_same = sum(int((a == b).all(-1).sum()) for a, b in zip(fp32, bf16))
    return {"images": len(images), "side": side, "codes": total, "identical_fraction": same / total,
            "identical_patch_fraction": patch_same / (total // cfg.head.slots)}


def bench(p: dict, device: str) -> dict:
    """``viqctl bench --seq ... --llm ...``: forward and training step, offline vs online."""
    from viq.bench import BenchConfig, parse_seq, run_bench

    cfg = BenchConfig(seq_lens=parse_seq(p["seq"]), llms=p["llm"].split(","), encoder=p["encoder"],
                      image_size=p["image_size"], warmup=p["warmup"], repeats=p["repeats"], device=device)
    res = run_bench(cfg).to_dict()
    summary = [{k: r.get(k) for k in ("llm", "seq_len", "mode", "status", "speedup", "ratio")}
               | {"online_s": (r.get("online") or {}).get("median_s"),
                  "offline_s": (r.get("offline") or {}).get("median_s")} for r in res["runs"]]
    return {"command": f"viqctl bench --seq {p['seq']} --llm {p['llm']}", "summary": summary, "result": res}


def _sibling(name: str):
    """A script beside this one (offline_attention.py, train_check.py) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def offline_attention(p: dict, device: str) -> dict:
    """The offline MLLM stage's packed attention modes (flash_attention_2 when installed) vs the block mask."""
    return _sibling("offline_attention").measure(device=device, **p["offline_attention"])


def train_engines(p: dict, device: str) -> dict:
    """The one training engine under DeepSpeed ZeRO-1, FSDP2 and plain: optimizer steps per accumulation."""
    import tempfile

    mod = _sibling("train_check")
    with tempfile.TemporaryDirectory(prefix="viq-train-check-") as tmp:
        return mod.engines(device.startswith("cuda"), mod.make_world(Path(tmp)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (runs on CPU in seconds)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON written (default: gpu_check.json)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the sections that would start after this many seconds (default: 480 full, none tiny)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: encode_square, encode_mixed, encode_pipeline, "
                                                "attention, agreement, bench, offline_attention, train_engines")
    args = ap.parse_args(argv)

    from viq.config import preset_config
    from viq.tokenizer import ViQTokenizer, default_device

    p = TINY if args.tiny else FULL
    device = args.device or default_device()
    if not args.tiny and args.device is None and not device.startswith("cuda"):
        sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                 "the full check on a CPU would run for hours. Use --tiny, or --device cpu to insist.")
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 480.0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_start = time.perf_counter()
    deadline = None if budget is None else t_start + budget
    out = Path(args.out)
    results: dict = {"schema": "viq-gpu-check v1", "mode": "tiny" if args.tiny else "full", "params": p,
                     "budget_s": budget}
    results["machine"] = mach = machine(device, dtype)
    write_json(results, out)
    cfg = preset_config(p["arch"], "16k")

    def run(name, fn):
        if name not in skip:
            section(results, name, fn, out, deadline)

    torch.manual_seed(0)
    tok = ViQTokenizer(random_encoder(cfg, device, dtype), cfg)
    sq = p["square"]
    run("encode_square", lambda: encode_rate(tok, [(sq, sq)] * p["images"], p["token_budget"], device, p, mach))
    shapes = [p["mixed"][i % len(p["mixed"])] for i in range(p["images"])]
    run("encode_mixed", lambda: encode_rate(tok, shapes, p["token_budget"], device, p, mach))
    run("encode_pipeline", lambda: encode_pipeline(tok, device, p))
    del tok
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    run("agreement", lambda: code_agreement(cfg, device, p))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    run("bench", lambda: bench(p, device))
    run("offline_attention", lambda: offline_attention(p, device))
    run("train_engines", lambda: train_engines(p, device))
    # last: it compiles FlexAttention and runs every experimental kernel; a sticky CUDA error there
    # (one that poisons the context) would otherwise fail every section after it
    run("attention", lambda: attention_backends(device, dtype, cfg, p))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(results, out)
    brief = {k: results[k].get("images_per_s") or results[k].get("pipeline_over_model") or results[k].get("fastest")
             or results[k].get("identical_fraction")
             for k in ("encode_square", "encode_mixed", "encode_pipeline", "attention", "agreement")
             if isinstance(results.get(k), dict)}
    print(json.dumps({"out": str(out), "total_seconds": results["total_seconds"], **brief}))
    return results


if __name__ == "__main__":
    main()
