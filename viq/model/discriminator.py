"""A PatchGAN discriminator (pix2pix / VQGAN style): one real/fake logit per overlapping image patch.

    conv4x4 s2 ─LeakyReLU─▶ (layers - 1) x [conv4x4 s2, norm, LeakyReLU]
      ─▶ conv4x4 s1, norm, LeakyReLU ─▶ conv4x4 s1 ─▶ logits

Images come one at a time at their own size (the decoder stage trains on mixed sizes), so the
default norm is GroupNorm rather than BatchNorm. Images smaller than ``min_side`` are padded
(reflect) so that every image yields at least one logit.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3,
                 norm: Literal["group", "batch", "none"] = "group", spectral_norm: bool = False,
                 groups: int = 32):
        super().__init__()
        self.layers = layers

        def conv(cin, cout, stride):
            c = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=norm == "none")
            return _spectral_norm(c) if spectral_norm else c

        def make_norm(c):
            if norm == "group":
                return nn.GroupNorm(min(groups, c), c)
            if norm == "batch":
                return nn.BatchNorm2d(c)
            return nn.Identity()

        mods: list[nn.Module] = [conv(in_channels, channels, 2), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            cout = channels * min(2 ** i, 8)
            mods += [conv(c, cout, 2 if i < layers else 1), make_norm(cout), nn.LeakyReLU(0.2)]
            c = cout
        out = nn.Conv2d(c, 1, 4, stride=1, padding=1)
        mods.append(_spectral_norm(out) if spectral_norm else out)
        self.net = nn.Sequential(*mods)

    @property
    def min_side(self) -> int:
        """The smallest input side that still yields one logit."""
        # layers stride-2 convs (k4 p1) halve the side; the two stride-1 convs (k4 p1) take 1 each.
        return 2 ** self.layers * 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> patch logits (B, 1, h', w')."""
        h, w = images.shape[-2:]
        m = self.min_side
        if h < m or w < m:
            images = F.pad(images, (0, max(0, m - w), 0, max(0, m - h)), mode="replicate")
        return self.net(images)
