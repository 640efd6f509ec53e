"""Encode throughput and peak memory: packed batches vs the same images one at a time.

    python benchmarks/encode.py --arch tiny --images 64 --side 224
    python benchmarks/encode.py --arch giant --images 4 --side 512 --from-file   # peak memory check

Random weights are fine for timing. Both paths run in this process, alternately, so drift hits both;
the script prints the ratio. ``--from-file`` first writes the weights in the reference layout and
loads only the encoding parts, then compares peak RSS with the size of the whole encoder file and
with a baseline measured in a child process: the whole file read into memory and a full model
built and filled from it, as the reference loads it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """This process's peak resident memory. /proc's VmHWM, not ru_maxrss: Linux carries ru_maxrss
    across exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "so400m", "giant"])
    ap.add_argument("--size", default="16k")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--side", type=int, default=224, help="images are side x (side * 3 / 4), and side/2 squares")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--from-file", action="store_true", help="load the encoder from a reference-layout file")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-file", default=None, help=argparse.SUPPRESS)  # child process: write weights, exit
    ap.add_argument("--whole-file-load", default=None, help=argparse.SUPPRESS)  # child: the baseline load
    args = ap.parse_args(argv)

    from viq.config import preset_config
    from viq.model.viq_model import ViQModel
    from viq.packing import batches_by_budget
    from viq.tokenizer import ViQTokenizer, default_device, load_tokenizer, resolve_dtype

    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    cfg = preset_config(args.arch, args.size)
    file_bytes = None
    if args.write_file:
        from viq.weights.save import export_reference

        torch.manual_seed(0)
        export_reference(ViQModel(cfg).state_dict(), cfg, Path(args.write_file), args.size)
        return {"written": args.write_file}
    if args.whole_file_load:
        # the reference's way: torch.load the whole file (no mmap), build every part, copy the tensors in
        weights = Path(args.whole_file_load) / f"model_viq_fsq_{args.size}.pth"
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        model = ViQModel(cfg)
        model.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)  # touch every tensor
        for t in sd.values():
            t.add_(0)  # resident, as after a real copy
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return {"baseline": True}
    if args.from_file:
        import subprocess

        # Written by a child process, so building the full model does not count in our peak RSS.
        tmp = Path(tempfile.mkdtemp(prefix="viq-bench-"))
        subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size", args.size, "--write-file", str(tmp)],
                       check=True)
        file_bytes = (tmp / f"model_viq_fsq_{args.size}.pth").stat().st_size
        rss_before = peak_rss_bytes()
        tok = load_tokenizer(tmp, parts=("encoder",), device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = ViQModel(cfg, parts=("encoder",)).to(device, dtype).eval().requires_grad_(False)
        tok = ViQTokenizer(model, cfg)
        rss_before = None

    g = torch.Generator().manual_seed(0)
    shapes = [(args.side * 3 // 4, args.side) if i % 2 else (args.side // 2, args.side // 2) for i in range(args.images)]
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in shapes]
    counts = [((h + 15) // 16) * ((w + 15) // 16) for h, w in shapes]
    batches = batches_by_budget(counts, args.token_budget)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def packed():
        for b in batches:
            tok.encode_pixels([images[i] for i in b])

    def single():
        for im in images:
            tok.encode_pixels([im])

    packed(), single()  # warm-up
    times = {"packed": [], "one_by_one": []}
    for _ in range(args.repeats):
        for name, fn in (("packed", packed), ("one_by_one", single)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "arch": args.arch, "size": args.size, "device": str(device), "dtype": str(dtype), "images": args.images,
        "tokens": sum(counts), "batches": len(batches),
        "images_per_s": {k: args.images / v for k, v in med.items()},
        "median_s": med, "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
        "speedup_packed_vs_one_by_one": med["one_by_one"] / med["packed"],
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if str(device).startswith("cuda"):
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    if file_bytes is not None:
        import shutil

        result["encoder_file_bytes"] = file_bytes
        result["peak_rss_over_file"] = result["peak_rss_bytes"] / file_bytes
        result["rss_before_load_bytes"] = rss_before
        import subprocess

        p = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size", args.size,
                            "--whole-file-load", str(tmp)], check=True, capture_output=True, text=True)
        base = json.loads(p.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        result["baseline_whole_file_peak_rss_bytes"] = base
        result["peak_rss_over_baseline"] = result["peak_rss_bytes"] / base
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
