"""Encode throughput, achieved FLOP/s and peak memory, each against a baseline run in the same process.

    python benchmarks/encode.py --arch so400m --workload mixed16                  # speed vs matmul
    python benchmarks/encode.py --arch giant --workload mixed16 --from-file --repeats 1 --no-one-by-one --no-baseline-encode
    python benchmarks/encode.py --arch tiny --images 64 --side 224               # packed vs one by one

Random weights (timing does not depend on the values). Workloads: ``mixed16`` is 16 images from
256x256 to 640x480 (12 992 patches); ``pairs`` alternates side x 3/4 side and half-side squares.

* Speed: packed batches (``--token-budget``) against the same images one at a time, alternately;
  the model's FLOPs (counted by torch on the meta device) over the median time give the achieved
  FLOP/s, printed against an fp32 matmul measured in this process (so a regression shows).
* Memory (``--from-file``): a child writes the weights in the reference layout; this process loads
  only the encoder (memory-mapped) and prints where its peak goes: the interpreter and torch, the
  weights (file-backed pages vs anonymous copies), the activations. The baseline, in a child
  process, does it the reference's way: the whole file read into memory, every part built and
  filled, then all images encoded in one packed batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MIXED16 = [(256, 256), (384, 288), (512, 384), (384, 512), (480, 480), (640, 480), (480, 640), (576, 432)] * 2


def memory_status() -> dict:
    """Resident memory of this process from /proc: peak (VmHWM), now, anonymous and file-backed."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def peak_rss_bytes() -> int:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's."""
    return memory_status()["VmHWM"]


def workload(args) -> list[tuple[int, int]]:
    """(width, height) per image."""
    if args.workload == "mixed16":
        return list(MIXED16)
    s = args.side
    return [(s, s * 3 // 4) if i % 2 else (s // 2, s // 2) for i in range(args.images)]


def arch_config(args):
    from viq.config import preset_config, tiny_config

    if args.arch == "tiny" and (args.width or args.depth):
        width = args.width or 64
        return tiny_config(args.size, width=width, depth=args.depth or 2, heads=max(1, width // 64))
    return preset_config(args.arch, args.size)


def arch_args(args) -> list[str]:
    """The model options, passed on to the child processes."""
    out = ["--arch", args.arch, "--size", args.size]
    for name in ("width", "depth"):
        if getattr(args, name):
            out += [f"--{name}", str(getattr(args, name))]
    return out


def make_images(shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for w, h in shapes]


def model_flops(cfg, shapes, batches) -> int:
    """FLOPs of encoding these images in these batches, counted on the meta device (no compute)."""
    from viq.model.viq_model import ViQModel
    from viq.nn.flops import count_flops

    with torch.device("meta"):
        model = ViQModel(cfg, parts=("encoder",)).eval()
    angles = model.head.angles
    model.head.angles = lambda packing: angles(packing).to("meta")  # RoPE angles are computed on the CPU
    total = 0
    with torch.inference_mode():
        for b in batches:
            ims = [torch.empty(3, shapes[i][1], shapes[i][0], device="meta") for i in b]
            total += count_flops(lambda ims=ims: model.encode(ims))
    return total


def baseline_child(args, folder: Path) -> dict:
    """The reference's way: torch.load the whole file (no mmap), build every part, copy the tensors
    in, drop the file's copy, then encode all the images in one packed batch."""
    from viq.model.viq_model import ViQModel

    cfg = arch_config(args)
    sd = torch.load(folder / f"model_viq_fsq_{args.size}.pth", map_location="cpu", weights_only=True)
    for t in sd.values():
        t.add_(0)  # resident, as after a real read
    model = ViQModel(cfg)
    for p in model.parameters():
        p.data.add_(0)
    after_load = peak_rss_bytes()
    del sd
    if args.baseline_encode:
        with torch.inference_mode():
            model.encode(make_images(workload(args)))
    return {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": after_load}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "so400m", "giant"])
    ap.add_argument("--width", type=int, default=None, help="tiny arch: ViT width (default 64)")
    ap.add_argument("--depth", type=int, default=None, help="tiny arch: ViT depth (default 2)")
    ap.add_argument("--size", default="16k")
    ap.add_argument("--workload", default="pairs", choices=["pairs", "mixed16"])
    ap.add_argument("--images", type=int, default=32, help="pairs workload: number of images")
    ap.add_argument("--side", type=int, default=224, help="pairs workload: side x (side * 3 / 4), and side/2 squares")
    ap.add_argument("--token-budget", type=int, default=None,
                    help="patch tokens per packed batch (default: what viq encode uses on this device)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-one-by-one", dest="one_by_one", action="store_false",
                    help="time only the packed batches (halves the run at giant size)")
    ap.add_argument("--memory-only", action="store_true",
                    help="encode only the largest packed batch, once: the peak is the same (batches are bounded "
                         "by the budget), the run much shorter at giant size")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--from-file", action="store_true", help="load the encoder from a reference-layout file and "
                                                             "measure memory against the reference-style baseline")
    ap.add_argument("--no-baseline-encode", dest="baseline_encode", action="store_false",
                    help="the baseline child only loads (faster; its peak is then a lower bound)")
    ap.add_argument("--no-bound-heap", dest="bound_heap", action="store_false",
                    help="leave glibc's malloc thresholds alone (encode_to_store bounds them on CPU)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    ap.add_argument("--write-file", default=None, help=argparse.SUPPRESS)  # child process: write weights, exit
    ap.add_argument("--whole-file-load", default=None, help=argparse.SUPPRESS)  # child: the baseline
    args = ap.parse_args(argv)

    from viq.encode import EncodeOptions, resolve_token_budget
    from viq.heap import bound_heap
    from viq.model.viq_model import ViQModel
    from viq.nn.flops import matmul_flops_per_s
    from viq.packing import batches_by_budget, tokens_of
    from viq.tokenizer import ViQTokenizer, default_device, load_tokenizer, resolve_dtype

    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    cfg = arch_config(args)
    if args.write_file:
        from viq.weights.save import export_reference

        torch.manual_seed(0)
        export_reference(ViQModel(cfg).state_dict(), cfg, Path(args.write_file), args.size)
        return {"written": args.write_file}
    if args.whole_file_load:
        print(json.dumps(baseline_child(args, Path(args.whole_file_load))))
        return {"baseline": True}

    mem = {"start": memory_status()}
    load_start = os.getloadavg()  # other jobs on the cores: printed beside the numbers
    file_bytes = tmp = None
    if args.from_file:
        import subprocess

        # Written by a child process, so building the full model does not count in our peak RSS.
        tmp = Path(tempfile.mkdtemp(prefix="viq-bench-"))
        subprocess.run([sys.executable, __file__, *arch_args(args), "--write-file", str(tmp)],
                       check=True)
        file_bytes = (tmp / f"model_viq_fsq_{args.size}.pth").stat().st_size
        mem["before_load"] = memory_status()
        tok = load_tokenizer(tmp, parts=("encoder",), device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = ViQModel(cfg, parts=("encoder",)).to(device, dtype).eval().requires_grad_(False)
        tok = ViQTokenizer(model, cfg)
        mem["before_load"] = mem["start"]
    mem["after_load"] = memory_status()
    heap_bounded = args.bound_heap and str(device) == "cpu" and bound_heap()  # as viq.encode.encode_to_store does
    budget = args.token_budget or resolve_token_budget(EncodeOptions(token_budget=None), tok)

    shapes = workload(args)
    images = make_images(shapes)
    counts = [tokens_of(w, h) for w, h in shapes]
    batches = batches_by_budget(counts, budget)
    if args.memory_only:
        batches = [max(batches, key=lambda b: sum(counts[i] for i in b))]
        args.repeats, args.one_by_one = 1, False
    n_images = sum(len(b) for b in batches)
    n_tokens = sum(counts[i] for b in batches for i in b)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def packed():
        for b in batches:
            tok.encode_pixels([images[i] for i in b])

    def single():
        for im in images:
            tok.encode_pixels([im])

    fns = {"packed": packed}
    if args.one_by_one:
        fns["one_by_one"] = single
    if args.repeats > 1:  # warm-up (one run then counts as the warm-up at giant size)
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    mem["after_encode"] = memory_status()
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = model_flops(cfg, shapes, batches)
    matmul = matmul_flops_per_s(device, dtype, n=2048, seconds=2.0)
    achieved = flops / med["packed"]
    result = {
        "arch": args.arch, "size": args.size, "device": str(device), "dtype": str(dtype), "workload": args.workload,
        "memory_only": args.memory_only, "images": n_images, "tokens": n_tokens, "token_budget": budget,
        "batches": len(batches),
        "threads": torch.get_num_threads(),
        "images_per_s": {k: n_images / v for k, v in med.items()},
        "median_s": med, "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
        "model_flops": flops, "achieved_gflops_per_s": achieved / 1e9, "matmul_gflops_per_s": matmul / 1e9,
        "achieved_over_matmul": achieved / matmul,
        "peak_rss_bytes": peak_rss_bytes(), "heap_bounded": bool(heap_bounded),
    }
    if args.one_by_one:
        result["speedup_packed_vs_one_by_one"] = med["one_by_one"] / med["packed"]
    if str(device).startswith("cuda"):
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    weight_bytes = sum(p.numel() * p.element_size() for p in tok.model.parameters())
    before, after = mem["before_load"], mem["after_load"]
    result["memory_breakdown_bytes"] = {
        "interpreter_and_torch": before.get("VmRSS"),
        "encoder_weights": weight_bytes,
        "weights_file_backed": after.get("RssFile", 0) - before.get("RssFile", 0),
        "weights_anonymous_copies": after.get("RssAnon", 0) - before.get("RssAnon", 0),
        "activations_and_rest": result["peak_rss_bytes"] - after.get("VmRSS", 0),
    }
    if file_bytes is not None:
        import shutil
        import subprocess

        result["encoder_file_bytes"] = file_bytes
        result["peak_rss_over_file"] = result["peak_rss_bytes"] / file_bytes
        cmd = [sys.executable, __file__, *arch_args(args), "--workload", args.workload,
               "--images", str(args.images), "--side", str(args.side), "--whole-file-load", str(tmp)]
        if not args.baseline_encode:
            cmd.append("--no-baseline-encode")
        p = subprocess.run(cmd, check=True, capture_output=True, text=True)
        base = json.loads(p.stdout.strip().splitlines()[-1])
        result["baseline"] = {"kind": "whole file read, every part built and filled, "
                                      + ("all images in one batch" if args.baseline_encode else "no encode"),
                              **base}
        result["peak_rss_over_baseline"] = result["peak_rss_bytes"] / base["peak_rss_bytes"]
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_1_5_15"] = {"start": list(load_start), "end": list(os.getloadavg())}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
