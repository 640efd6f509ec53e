"""A folder of many small images, where per-image overheads dominate: pipeline rate vs model rate.

    python benchmarks/encode_folder.py                       # 1000 JPEGs of 32..96 px, so400m-shaped head
    python benchmarks/encode_folder.py --arch tiny --images 200

The same images are encoded in this process, alternately: already decoded, packed into the same
batches (the pure model rate), and from the folder through ``encode_to_store`` (read, hash,
decode + resize, model, Parquet) with each ``--workers`` count (0 = decoding between batches, the
CPU default). The ratio of the best runs is the pipeline's efficiency (goal >= 0.9); the per-round
ratios show what other jobs on the cores did to it. A torch.profiler breakdown of the pipeline run shows where the rest goes (the
``viq.*`` labels of ``viq.encode``: read, sha256, decode_resize, model, store).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_folder(root: Path, n: int, lo: int, hi: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(lo, hi + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), np.full_like(xx, i % 256)], -1)
        img = (img + rng.integers(0, 32, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i:05d}.jpg", quality=90)


def decoded_batches(sources, tok, opts, budget: int):
    """The pure model's input: every source decoded as the pipeline decodes it, in the batches it forms
    -> (pixels, token counts, batches as index lists)."""
    from viq.images import Preprocessor, parse_policy
    from viq.packing import batches_by_budget, tokens_of

    prep = Preprocessor(parse_policy(opts.policy), opts.max_input_pixels)
    pixels = [prep(s.path.read_bytes(), name=s.name)[0] for s in sources]
    counts = [tokens_of(p.shape[2], p.shape[1], tok.patch) for p in pixels]
    return pixels, counts, batches_by_budget(counts, budget)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--min-side", type=int, default=32)
    ap.add_argument("--max-side", type=int, default=96)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "so400m", "giant"])
    ap.add_argument("--width", type=int, default=384, help="tiny arch: ViT width")
    ap.add_argument("--depth", type=int, default=6, help="tiny arch: ViT depth")
    ap.add_argument("--workers", default="0,1,2",
                    help="decode threads to compare, comma-separated (0 = decode between batches, in the encoding thread)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs of each; the best counts")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from viq.config import preset_config, tiny_config
    from viq.encode import EncodeOptions, encode_to_store, resolve_token_budget
    from viq.model.viq_model import ViQModel
    from viq.sources import collect_sources
    from viq.tokenizer import ViQTokenizer

    cfg = (tiny_config("16k", width=args.width, depth=args.depth, heads=max(1, args.width // 64))
           if args.arch == "tiny" else preset_config(args.arch))
    torch.manual_seed(0)
    tok = ViQTokenizer(ViQModel(cfg, parts=("encoder",)).eval().requires_grad_(False), cfg)
    worker_counts = [int(w) for w in str(args.workers).split(",")]
    opts = EncodeOptions(workers=worker_counts[0])
    budget = resolve_token_budget(opts, tok)
    work = Path(tempfile.mkdtemp(prefix="viq-folder-"))
    folder = work / "images"
    write_folder(folder, args.images, args.min_side, args.max_side)
    sources = collect_sources([str(folder)])

    pixels, counts, batches = decoded_batches(sources, tok, opts, budget)  # the pure model rate's input

    def model_only():
        for b in batches:
            tok.encode_pixels([pixels[i] for i in b])

    def pipeline(out, workers):
        return encode_to_store(sources, tok, out, {}, EncodeOptions(workers=workers))

    load_start = os.getloadavg()
    model_only()  # warm-up
    names = {w: f"pipeline_workers_{w}" for w in worker_counts}
    times = {"model": []} | {name: [] for name in names.values()}
    for r in range(args.repeats):  # alternate, so drift hits all
        t0 = time.perf_counter()
        model_only()
        times["model"].append(time.perf_counter() - t0)
        for w, name in names.items():
            t0 = time.perf_counter()
            summary = pipeline(work / f"store{r}-{w}", w)
            times[name].append(time.perf_counter() - t0)
            assert summary.encoded == len(sources), summary.as_dict()
    best = {k: min(v) for k, v in times.items()}
    ratios = {w: best["model"] / best[name] for w, name in names.items()}
    best_workers = max(ratios, key=ratios.get)
    result = {"images": len(sources), "tokens": sum(counts), "token_budget": budget, "batches": len(batches),
              "arch": args.arch, "width": cfg.vit.width, "depth": cfg.vit.depth, "workers_compared": worker_counts,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "seconds": times,
              "images_per_s": {k: len(sources) / v for k, v in best.items()},
              "pipeline_over_model_by_workers": {str(w): r for w, r in ratios.items()},
              "best_workers": best_workers, "pipeline_over_model": ratios[best_workers],
              # each run against the model run just before it: what a changing load does to the ratio
              "pipeline_over_model_per_round": {str(w): [m / p for m, p in zip(times["model"], times[name])]
                                                for w, name in names.items()},
              "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())}}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipeline(work / "store-prof", best_workers)
        labels = {}
        for ev in prof.key_averages():
            if ev.key.startswith("viq."):
                labels[ev.key] = {"calls": ev.count, "cpu_total_s": ev.cpu_time_total / 1e6}
        result["profile_viq_labels"] = labels
        result["profile_top_ops"] = [{"op": ev.key, "self_cpu_s": ev.self_cpu_time_total / 1e6}
                                     for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]]
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
