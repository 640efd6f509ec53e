"""One call for the whole evaluation of a set of reconstructions, and a side-by-side image grid.

``evaluate`` crops each reconstruction to its original's size (codes cover the image padded to a
multiple of the patch, right and bottom), then reports per image and on average: PSNR, SSIM, LPIPS
(with a perceptual net), rFID over the set (with a feature net; see ``viq.eval.fid`` for the
protocol), codebook usage and bits per pixel. Averages are means over images; PSNR averages only the
finite values and counts identical pairs in ``psnr_identical``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from viq.errors import ConfigError
from viq.eval.fid import rfid
from viq.eval.metrics import as_uint8, bits_per_pixel, codebook_usage, psnr, ssim


def _to_pixels(img: np.ndarray, device) -> torch.Tensor:
    return (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().to(device) / 127.5) - 1.0


def crop_to(recon, original) -> np.ndarray:
    """The reconstruction cropped to the original's (H, W) from the top-left corner."""
    r, o = as_uint8(recon), as_uint8(original)
    if r.shape[0] < o.shape[0] or r.shape[1] < o.shape[1]:
        raise ConfigError(f"reconstruction {r.shape[:2]} is smaller than its original {o.shape[:2]}")
    return r[:o.shape[0], :o.shape[1]]


def evaluate(originals: Sequence, reconstructions: Sequence, codes: Sequence, codebook_size: int,
             perceptual=None, fid_net=None, patch: int = 16, slots: int = 4) -> dict:
    """Reconstruction quality and code statistics of one set of images.

    ``originals``: uint8 (H, W, 3), the images as fed to the tokenizer; ``reconstructions``: uint8 at
    least that large (usually the padded size); ``codes``: per image (h, w, slots) ints.
    Returns plain Python values (``rfid`` is None without a feature net or with fewer than 2 images;
    a per-image ``psnr`` is ``inf`` for an identical pair: map it to null before strict JSON).
    """
    n = len(originals)
    if len(reconstructions) != n or len(codes) != n:
        raise ConfigError(f"{n} originals, {len(reconstructions)} reconstructions and {len(codes)} code grids: "
                          "they must pair up")
    if n == 0:
        raise ConfigError("nothing to evaluate: no images")
    origs = [as_uint8(o) for o in originals]
    recons = [crop_to(r, o) for r, o in zip(reconstructions, origs)]
    per_image = []
    for o, r in zip(origs, recons):
        per_image.append({"height": int(o.shape[0]), "width": int(o.shape[1]), "psnr": psnr(o, r), "ssim": ssim(o, r)})
    if perceptual is not None:
        device = next(perceptual.parameters()).device
        with torch.no_grad():
            for row, o, r in zip(per_image, origs, recons):
                row["lpips"] = float(perceptual(_to_pixels(o, device), _to_pixels(r, device))[0])
    finite = [row["psnr"] for row in per_image if math.isfinite(row["psnr"])]
    out = {
        "images": n,
        "psnr": float(np.mean(finite)) if finite else math.inf,
        "psnr_identical": n - len(finite),
        "ssim": float(np.mean([row["ssim"] for row in per_image])),
        "lpips": float(np.mean([row["lpips"] for row in per_image])) if perceptual is not None else None,
        "rfid": rfid(origs, recons, fid_net) if fid_net is not None and n >= 2 else None,
        "codebook": codebook_usage(codes, codebook_size, slots),
        "bits_per_pixel": bits_per_pixel([(int(c.shape[0]), int(c.shape[1])) for c in codes], codebook_size,
                                         [(row["height"], row["width"]) for row in per_image], patch, slots),
        "per_image": per_image,
    }
    return out


def image_grid(originals: Sequence, reconstructions: Sequence, path, max_side: Optional[int] = 512,
               gap: int = 4, background: int = 32) -> Path:
    """A PNG with one row per image: original | reconstruction (cropped to the original's size).

    Images whose longer side exceeds ``max_side`` are shrunk (Lanczos) for the grid only. Written to a
    temporary file in the same directory and renamed into place.
    """
    from PIL import Image

    if len(originals) != len(reconstructions) or not originals:
        raise ConfigError(f"image_grid needs pairs: {len(originals)} originals, {len(reconstructions)} reconstructions")
    rows = []
    for o, r in zip(originals, reconstructions):
        o = as_uint8(o)
        pair = [Image.fromarray(o), Image.fromarray(crop_to(r, o))]
        if max_side and max(o.shape[:2]) > max_side:
            s = max_side / max(o.shape[:2])
            size = (max(1, round(o.shape[1] * s)), max(1, round(o.shape[0] * s)))
            pair = [im.resize(size, Image.LANCZOS) for im in pair]
        rows.append(pair)
    width = max(a.width + b.width for a, b in rows) + 3 * gap
    height = sum(a.height for a, _ in rows) + (len(rows) + 1) * gap
    canvas = Image.new("RGB", (width, height), (background,) * 3)
    y = gap
    for a, b in rows:
        canvas.paste(a, (gap, y))
        canvas.paste(b, (2 * gap + a.width, y))
        y += a.height + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
