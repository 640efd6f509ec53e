"""Reconstruct's VAE decode: time per pixel as images grow, tiled against untiled, in one run.

    python benchmarks/reconstruct.py --tile-above 1024                 # 16 px high, 4096..16384 px wide
    python benchmarks/reconstruct.py --height 512 --widths 512,1024,2048

The drawer's VAE decoder at the published size (Qwen-Image's, random weights: timing does not
depend on the values) decodes latents of one-patch-high images of growing width, alternately
untiled and in tiles of at most ``--tile-above`` latent positions (``decode_latent`` tiles above
``TILE_ABOVE`` = 1 MP, with tiles of that size; on 2 CPU cores a 1 MP decode takes minutes, so a
smaller budget shows the tiling's cost at sizes a run can afford). Tiled, seconds per megapixel
must stay flat as the width grows, and close to untiled (the tiles' overlap is the only extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=16, help="image height in pixels (a multiple of 16)")
    ap.add_argument("--widths", default="4096,8192,16384", help="image widths in pixels (multiples of 16)")
    ap.add_argument("--tile-above", type=int, default=None,
                    help="latent positions per tile (and above which to tile); default: TILE_ABOVE, as reconstruct")
    ap.add_argument("--no-untiled", dest="untiled", action="store_false", help="time only the tiled decode")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from viq.config import DrawerConfig
    from viq.model.drawer import TILE_ABOVE, build_vae_decoder, tile_shape

    torch.manual_seed(0)
    vae = build_vae_decoder(DrawerConfig()).eval()
    from viq.model.drawer import Drawer

    drawer = Drawer.__new__(Drawer)  # only decode_latent is used: hold the VAE alone, not the adapter
    torch.nn.Module.__init__(drawer)
    drawer.vae = vae
    rows = []
    tile_above = args.tile_above or TILE_ABOVE
    load_start = os.getloadavg()
    with torch.inference_mode():
        drawer.decode_latent(torch.randn(1, 16, 2, 8))  # warm-up
        for w in [int(x) for x in args.widths.split(",")]:
            latent = torch.randn(1, 16, args.height // 8, w // 8)
            row = {"width": w, "height": args.height, "latent_positions": latent.shape[-1] * latent.shape[-2]}
            modes = {"tiled": tile_above} | ({"untiled": None} if args.untiled else {})
            for name, above in modes.items():
                t0 = time.perf_counter()
                drawer.decode_latent(latent, tile_above=above)
                dt = time.perf_counter() - t0
                row[f"{name}_s"] = dt
                row[f"{name}_s_per_mpx"] = dt / (w * args.height / 1e6)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    first = rows[0]
    result = {"tile_above_positions": tile_above, "tile_shape_at_largest": tile_shape(
                  args.height // 8, rows[-1]["width"] // 8, tile_above),
              "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
              "threads": torch.get_num_threads(), "rows": rows,
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
