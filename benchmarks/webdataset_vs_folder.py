"""Images/s for a WebDataset .tar shard against the same images as a folder, in one process.

    python benchmarks/webdataset_vs_folder.py                      # 400 JPEGs of 256x192, 5 repeats
    python benchmarks/webdataset_vs_folder.py --images 2000 --side 512 --json

The same JPEG bytes are written once as files in a folder and once as members of one uncompressed
tar shard (with a .txt caption beside each image, as img2dataset writes them). Two stages are
timed, alternating folder and shard (ABAB...) so drift hits both alike, and the medians compared:

* ``list``: inputs -> sources (``collect_sources``: a folder walk vs reading the tar headers);
* ``read+decode``: every source's bytes (``SourceReader``) decoded and preprocessed (native policy),
  on ``--workers`` threads, exactly as ``viqctl encode`` feeds the model;
* ``encode`` (``--encode``): the whole ``encode_to_store`` with a tiny random model on the CPU, into
  a fresh store each time (the model's share dilutes the difference; shown for completeness).

Ratio = shard images/s / folder images/s: >= 1 means reading tar members is not slower.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_data(root: Path, n: int, side: int) -> tuple[Path, Path]:
    from PIL import Image

    folder, shard = root / "folder", root / "shard-000000.tar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    w, h = side, side * 3 // 4
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, JPEG-sized like photos
    with tarfile.open(shard, "w") as tar:
        for i in range(n):
            img = Image.fromarray(np.roll(base, i, axis=1)).resize((w, h), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            key = f"{i:09d}"
            (folder / f"{key}.jpg").write_bytes(data)
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder, shard


def read_decode(sources, workers: int) -> None:
    from viq.images import Native, Preprocessor
    from viq.sources import SourceReader

    reader, prep = SourceReader(), Preprocessor(Native())

    def work(src):
        return prep(reader.read(src), name=src.name)[0].shape

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, sources):
            pass


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--side", type=int, default=256, help="image width (height = 3/4 of it)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--encode", action="store_true", help="also time encode_to_store with a tiny random model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from viq.sources import collect_sources

    root = Path(tempfile.mkdtemp(prefix="viq-wds-bench-"))
    try:
        folder, shard = make_data(root, args.images, args.side)
        inputs = {"folder": str(folder), "shard": str(shard)}
        sources = {k: collect_sources([v]) for k, v in inputs.items()}
        assert len(sources["folder"]) == len(sources["shard"]) == args.images
        stages = {
            "list": lambda k: collect_sources([inputs[k]]),
            "read+decode": lambda k: read_decode(sources[k], args.workers),
        }
        if args.encode:
            from viq.config import tiny_config
            from viq.demo import random_model_dir
            from viq.encode import EncodeOptions, encode_to_store
            from viq.tokenizer import load_tokenizer

            random_model_dir(root / "model", tiny_config("16k"), seed=0)
            tok = load_tokenizer(root / "model", parts=("encoder",), device="cpu")
            runs = iter(range(10 ** 6))
            stages["encode"] = lambda k: encode_to_store(sources[k], tok, root / f"store-{next(runs)}", {},
                                                         EncodeOptions(workers=args.workers))
        for fn in stages.values():  # warm-up: page cache, thread pools, PIL plugins
            fn("folder"), fn("shard")
        result = {"images": args.images, "size": [args.side, args.side * 3 // 4], "repeats": args.repeats,
                  "workers": args.workers, "stages": {}}
        for name, fn in stages.items():
            times = {"folder": [], "shard": []}
            for _ in range(args.repeats):
                for kind in ("folder", "shard"):
                    times[kind].append(timed(lambda: fn(kind)))
            med = {k: statistics.median(v) for k, v in times.items()}
            rate = {k: args.images / med[k] for k in med}
            result["stages"][name] = {"folder_images_per_s": round(rate["folder"], 1),
                                      "shard_images_per_s": round(rate["shard"], 1),
                                      "ratio_shard_over_folder": round(rate["shard"] / rate["folder"], 3)}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{args.images} JPEGs {result['size'][0]}x{result['size'][1]}, median of {args.repeats}, "
                  f"{args.workers} threads")
            print(f"{'stage':<12} {'folder img/s':>13} {'shard img/s':>12} {'shard/folder':>13}")
            for name, r in result["stages"].items():
                print(f"{name:<12} {r['folder_images_per_s']:>13.1f} {r['shard_images_per_s']:>12.1f} "
                      f"{r['ratio_shard_over_folder']:>13.3f}")
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
