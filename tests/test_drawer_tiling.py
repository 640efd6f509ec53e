"""The VAE decodes large latents in tiles (cost linear in pixels) and small ones exactly as before."""

import torch

from viq.config import tiny_config
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
    latent = torch.randn(1, 16, 2, 150)  # a 16 x 1200 px image: three 512 px tiles wide
    with torch.inference_mode():
        tiled = drawer.decode_latent(latent, tile_above=64)
        assert drawer.vae.use_tiling
        whole = drawer.decode_latent(latent, tile_above=None)
    assert tiled.shape == whole.shape == (16, 1200, 3) and tiled.dtype == torch.uint8
    # away from the blended seams the two agree closely where the mid-block attention matters little
    assert (tiled.int() - whole.int()).abs().float().mean() < 64
