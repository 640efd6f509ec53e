"""Bytes per code in the code store, against the alternatives, on the same codes in one run.

    python benchmarks/store_size.py                         # 256 images at 512x512, 16k codes
    python benchmarks/store_size.py --images 200 --side 512 --codes smooth

Codes: ``uniform`` draws every code independently (14 bits of entropy each for 16k: the worst case
any encoding can do is 1.75 B/code), ``smooth`` draws a random field that varies slowly across
patches, as a trained tokenizer's codes do on natural images (neighbours share codes). Each code
set is written through the real ``CodeStoreWriter`` (what ``viq encode`` writes), then the same
table is rewritten with Parquet settings varied (dictionary encoding, byte-stream split, zstd
level), and the codes alone are bit-packed at 14 bits and zstd-compressed as a reference.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_codes(kind: str, n: int, side: int, codebook: int, rng: np.random.Generator) -> list[np.ndarray]:
    h = w = math.ceil(side / 16)
    out = []
    for _ in range(n):
        if kind == "uniform":
            out.append(rng.integers(0, codebook, (h, w, 4)))
            continue
        # a smooth field: random codes on a coarse 4x4-patch grid, upsampled, with 25 % of slots redrawn
        coarse = rng.integers(0, codebook, (math.ceil(h / 4), math.ceil(w / 4), 4))
        c = coarse.repeat(4, 0).repeat(4, 1)[:h, :w]
        noise = rng.random((h, w, 4)) < 0.25
        c = np.where(noise, rng.integers(0, codebook, (h, w, 4)), c)
        out.append(c)
    return out


def bitpack(values: np.ndarray, bits: int) -> bytes:
    """Little-endian bit-packing of non-negative ints at ``bits`` bits each."""
    as_bits = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(as_bits.reshape(-1), bitorder="little").tobytes()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--size", default="16k")
    ap.add_argument("--codes", default="uniform,smooth", help="code kinds: uniform, smooth (comma-separated)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq
    import pyarrow as pa

    from viq.config import fsq_levels
    from viq.store import CodeStore, CodeStoreWriter, finalize_store

    levels = fsq_levels(args.size)
    codebook = int(np.prod(levels))
    bits = math.ceil(math.log2(codebook))
    result = {"images": args.images, "side": args.side, "codebook_size": codebook, "bits_per_code": bits,
              "entropy_bound_bytes_per_code": bits / 8, "kinds": {}}
    for kind in args.codes.split(","):
        rng = np.random.default_rng(0)
        codes = make_codes(kind, args.images, args.side, codebook, rng)
        n_codes = sum(c.size for c in codes)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            info = {"name": "bench", "fingerprint": "bench", "levels": levels, "codebook_size": codebook}
            with CodeStoreWriter(root, info, preprocess="bench") as writer:
                for i, c in enumerate(codes):
                    key = f"img{i:05d}"
                    writer.add(key, key, hashlib.sha256(key.encode()).hexdigest(), args.side, args.side, c)
            finalize_store(root)
            shards = sorted(root.glob("*.parquet"))
            store_bytes = sum(p.stat().st_size for p in shards)
            store_files = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            assert np.array_equal(CodeStore(root).get("img00000").codes, codes[0])  # the store reads back
            table = pq.read_table(shards)
        variants = {}
        for name, kw in {"store_default (zstd)": dict(compression="zstd"),
                         "no_dictionary+zstd": dict(compression="zstd", use_dictionary=["id", "source"]),
                         "zstd_level_9": dict(compression="zstd", compression_level=9),
                         "byte_stream_split+zstd": dict(compression="zstd", use_dictionary=["id", "source"],
                                                        use_byte_stream_split=["codes.list.element"]),
                         "no_dictionary+zstd_level_9": dict(compression="zstd", compression_level=9,
                                                            use_dictionary=["id", "source"]),
                         "byte_stream_split+zstd_level_9": dict(compression="zstd", compression_level=9,
                                                                use_dictionary=["id", "source"],
                                                                use_byte_stream_split=["codes.list.element"]),
                         "no_compression": dict(compression="none")}.items():
            buf = io.BytesIO()
            try:
                pq.write_table(table, buf, row_group_size=32, **kw)
                variants[name] = len(buf.getvalue()) / n_codes
            except Exception as exc:  # a setting this pyarrow lacks
                variants[name] = f"unsupported: {type(exc).__name__}"
        flat = np.concatenate([c.reshape(-1) for c in codes]).astype(np.int64)
        raw16 = flat.astype(np.uint16).tobytes()
        packed = bitpack(flat, bits)

        def zc(data: bytes) -> int:
            return pa.compress(data, codec="zstd", asbytes=True).__len__()

        result["kinds"][kind] = {
            "codes": n_codes,
            "store_bytes_per_code": store_bytes / n_codes,
            "store_all_files_bytes_per_code": store_files / n_codes,
            "parquet_variants_bytes_per_code": variants,
            "uint16_zstd_bytes_per_code": zc(raw16) / n_codes,
            "bitpacked_bytes_per_code": len(packed) / n_codes,
            "bitpacked_zstd_bytes_per_code": zc(packed) / n_codes,
        }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
