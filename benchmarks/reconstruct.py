"""Reconstruct's VAE decode: time per pixel as images grow, tiled against untiled, in one run.

    python benchmarks/reconstruct.py                                   # 16 px high, 6400..51200 px wide
    python benchmarks/reconstruct.py --height 512 --widths 512,1024,2048

The drawer's VAE decoder at the published size (Qwen-Image's, random weights: timing does not
depend on the values) decodes latents of one-patch-high images of growing width. Untiled, the
VAE's middle block attends over every latent position, so seconds per megapixel grow with the
width; tiled (what ``decode_latent`` does above ``TILE_ABOVE`` positions), they stay flat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=16, help="image height in pixels (a multiple of 16)")
    ap.add_argument("--widths", default="6400,12800,25600,51200", help="image widths in pixels (multiples of 16)")
    ap.add_argument("--no-untiled", dest="untiled", action="store_false", help="time only the tiled decode")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from viq.config import DrawerConfig
    from viq.model.drawer import TILE_ABOVE, build_vae_decoder

    torch.manual_seed(0)
    vae = build_vae_decoder(DrawerConfig()).eval()
    from viq.model.drawer import Drawer

    drawer = Drawer.__new__(Drawer)  # only decode_latent is used: hold the VAE alone, not the adapter
    torch.nn.Module.__init__(drawer)
    drawer.vae = vae
    rows = []
    with torch.inference_mode():
        drawer.decode_latent(torch.randn(1, 16, 2, 8))  # warm-up
        for w in [int(x) for x in args.widths.split(",")]:
            latent = torch.randn(1, 16, args.height // 8, w // 8)
            row = {"width": w, "height": args.height, "latent_positions": latent.shape[-1] * latent.shape[-2]}
            modes = {"tiled": 0} | ({"untiled": None} if args.untiled else {})
            for name, above in modes.items():
                t0 = time.perf_counter()
                drawer.decode_latent(latent, tile_above=above)
                dt = time.perf_counter() - t0
                row[f"{name}_s"] = dt
                row[f"{name}_s_per_mpx"] = dt / (w * args.height / 1e6)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    first = rows[0]
    result = {"tile_above_positions": TILE_ABOVE, "threads": torch.get_num_threads(), "rows": rows,
              "tiled_growth_s_per_mpx": rows[-1]["tiled_s_per_mpx"] / first["tiled_s_per_mpx"]}
    if args.untiled:
        result["untiled_growth_s_per_mpx"] = rows[-1]["untiled_s_per_mpx"] / first["untiled_s_per_mpx"]
        result["untiled_over_tiled_at_largest"] = rows[-1]["untiled_s"] / rows[-1]["tiled_s"]
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else
          "\n".join(f"{r['width']:>7} px: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k.endswith("mpx"))
                    for r in rows))
    return result


if __name__ == "__main__":
    main()
