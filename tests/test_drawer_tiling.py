"""The VAE decodes large latents in tiles (cost linear in pixels) and small ones exactly as before."""

import pytest
import torch

from viq.config import tiny_config
from viq.model.drawer import TILE_ABOVE, TILE_OVERLAP, tile_shape
from viq.model.viq_model import ViQModel


def _drawer():
    torch.manual_seed(0)
    return ViQModel(tiny_config(), parts=("drawer",)).drawer.eval()


def test_small_latents_decode_untiled_and_unchanged():
    drawer = _drawer()
    latent = torch.randn(1, 16, 4, 6)
    with torch.inference_mode():
        default = drawer.decode_latent(latent)
        assert not drawer.vae.use_tiling
        never = drawer.decode_latent(latent, tile_above=None)
    assert default.shape == (32, 48, 3) and default.dtype == torch.uint8
    assert torch.equal(default, never)


def test_a_long_thin_latent_decodes_in_tiles_at_full_size():
    drawer = _drawer()
    latent = torch.randn(1, 16, 2, 150)  # a 16 x 1200 px image: 2 x 32 latent tiles (16 x 256 px), five wide
    with torch.inference_mode():
        tiled = drawer.decode_latent(latent, tile_above=64)
        assert drawer.vae.use_tiling
        whole = drawer.decode_latent(latent, tile_above=None)
    assert tiled.shape == whole.shape == (16, 1200, 3) and tiled.dtype == torch.uint8
    # away from the blended seams the two agree closely where the mid-block attention matters little
    assert (tiled.int() - whole.int()).abs().float().mean() < 64


@pytest.mark.parametrize("h, w", [(2, 12500), (128, 129), (512, 512), (300, 40), (129, 20000)])
def test_tiles_hold_at_most_the_budget_and_keep_a_short_side_whole(h, w):
    th, tw, sh, sw = tile_shape(h, w, TILE_ABOVE)
    assert th * tw <= TILE_ABOVE and 0 < sh <= th and 0 < sw <= tw
    if h <= 128 < w:  # a strip: one row of wide tiles, overlapping by TILE_OVERLAP
        assert (th, sh) == (h, h) and tw == TILE_ABOVE // h and tw - sw == TILE_OVERLAP
    if w <= 128 < h:
        assert (tw, sw) == (w, w) and th == TILE_ABOVE // w
    if h > 128 and w > 128:
        assert th == tw == 128 and sh == sw == 128 - TILE_OVERLAP
