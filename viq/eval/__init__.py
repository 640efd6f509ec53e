"""Evaluation of reconstructions: PSNR, SSIM, LPIPS, rFID, codebook usage, bits per pixel."""

from viq.eval.fid import FeatureStats, extract_features, frechet_distance, load_fid_net, rfid
from viq.eval.metrics import bits_per_pixel, codebook_usage, psnr, ssim
from viq.eval.perceptual import LPIPS, DinoFeatures, load_dinov2, load_lpips
from viq.eval.report import evaluate, image_grid

__all__ = ["FeatureStats", "extract_features", "frechet_distance", "load_fid_net", "rfid", "bits_per_pixel",
           "codebook_usage", "psnr", "ssim", "LPIPS", "DinoFeatures", "load_dinov2", "load_lpips", "evaluate",
           "image_grid"]
