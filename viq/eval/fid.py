"""rFID: the Fréchet distance between Inception features of original images and their reconstructions.

Protocol (what ``rfid`` computes; say it next to any number you publish):
  * Pairs: each reconstruction is cropped to its original's size first (codes cover the image padded
    to a multiple of 16, right and bottom). The reference set is the originals *as fed to the
    tokenizer* (after the resize policy), so rFID measures reconstruction only.
  * Features: uint8 -> [0, 1] -> bilinear resize to 299 x 299 (align_corners=False, no antialias, as
    pytorch-fid) -> [-1, 1] -> FID-Inception-v3 (the TF 2015-12-05 graph ported to PyTorch,
    ``pt_inception-2015-12-05-6726825d.pth``) -> 2048-d pool3 features. Statistics in float64.
  * Comparable with published tokenizer rFIDs: ImageNet-1k val, all 50,000 images, shorter side
    resized to 256 and centre-cropped (``--policy center-crop:256``). Other sets and resolutions give
    numbers that only compare with themselves. With fewer than ~2,048 images the covariance is
    rank-deficient and rFID is biased upward: always report the image count with it.
  * Fréchet distance: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the trace of the square root
    taken from the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD, so no scipy and no complex parts).

The FID Inception is built here in code; its weights load from a local file (weights-only
``.pth`` or safetensors with the pytorch-fid key names: ``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ...; ``fc.*`` is ignored). ``tiny=True`` gives a small
random CNN for tests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.errors import ConfigError, KeyMismatchError, WeightsError
from viq.eval.metrics import as_uint8
from viq.weights.io import read_tensors

FID_DOWNLOAD_NAME = "inception-fid"


# ---- the Fréchet distance --------------------------------------------------------------------------
def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (covariances symmetric PSD)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums; features need not be kept)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, feats) -> None:
        f = np.asarray(feats, np.float64).reshape(-1, self.sum.size)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ConfigError(f"feature statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


# ---- feature networks --------------------------------------------------------------------------------
class BasicConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the TF graph's average pooling ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block of the FID graph max-pools its pool branch (the other averages)."""

    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FidInception(nn.Module):
    """FID-Inception-v3 up to the 2048-d pool3 features (pytorch-fid's module names)."""

    resolution = 299
    dim = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048)."""
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


class TinyFeatureNet(nn.Module):
    """A small random CNN with the same interface, for tests (its distances mean nothing)."""

    resolution = 32
    dim = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, self.dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1).mean(dim=(2, 3))


def load_fid_net(path: Optional[str | os.PathLike] = None, tiny: bool = False, device=None) -> nn.Module:
    """The FID Inception with weights from a local file (see the module docstring), or ``tiny=True``."""
    if tiny:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = TinyFeatureNet()
    else:
        if path is None:
            raise WeightsError(f"rFID needs the FID Inception weights; get them with "
                               f"`viqctl download {FID_DOWNLOAD_NAME}` and pass the file")
        path = Path(path).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
            if len(found) != 1:
                raise WeightsError(f"{path}: expected one FID Inception weights file there, found {len(found)}; "
                                   f"get it with `viqctl download {FID_DOWNLOAD_NAME}`")
            path = found[0]
        if not path.is_file():
            raise WeightsError(f"{path}: FID Inception weights not found; get them with "
                               f"`viqctl download {FID_DOWNLOAD_NAME}`")
        state = {k: v for k, v in read_tensors(path).items()
                 if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")}
        net = FidInception()
        expected = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise KeyMismatchError(f"FID Inception weights {path}", missing, unexpected, mismatched)
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    net.requires_grad_(False)
    net.eval()
    return net.to(device) if device is not None else net


# ---- rFID --------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(net: nn.Module, images: Sequence, batch_size: int = 32) -> np.ndarray:
    """uint8 (H, W, 3) images of any sizes -> (N, dim) float64 features (each resized by the net)."""
    device = next(net.parameters()).device
    feats, batch = [], []

    def flush():
        if batch:
            feats.append(net(torch.cat(batch).to(device)).double().cpu().numpy())
            batch.clear()

    for img in images:
        x = torch.from_numpy(as_uint8(img).copy()).permute(2, 0, 1)[None].float() / 255.0
        # resize to the net's square input now so that images of any size share a batch
        batch.append(F.interpolate(x, size=(net.resolution, net.resolution), mode="bilinear", align_corners=False))
        if len(batch) == batch_size:
            flush()
    flush()
    return np.concatenate(feats) if feats else np.zeros((0, net.dim))


def rfid(originals: Sequence, reconstructions: Sequence, net: nn.Module, batch_size: int = 32) -> float:
    """rFID of reconstructions against their originals (protocol in the module docstring)."""
    if len(originals) != len(reconstructions):
        raise ConfigError(f"{len(originals)} originals for {len(reconstructions)} reconstructions")
    if len(originals) < 2:
        raise ConfigError("rFID needs at least 2 images (thousands for a meaningful value)")
    stats = []
    for imgs in (originals, reconstructions):
        s = FeatureStats(net.dim)
        s.update(extract_features(net, imgs, batch_size))
        stats.append(s.mean_cov())
    (m1, s1), (m2, s2) = stats
    value = frechet_distance(m1, s1, m2, s2)
    return value if math.isfinite(value) else math.nan
