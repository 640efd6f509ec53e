"""The Python API takes file paths, PIL images and pixel tensors alike, and agrees with the CLI's preprocessing."""

import torch
from PIL import Image

from viq.images import parse_policy, prepare
from viq.tokenizer import load_tokenizer
from viq.weights.verify import example_images


def test_encode_accepts_paths_pil_images_and_tensors():
    tok = load_tokenizer(parts=("encoder", "decoder"), device="cpu")  # the bundled demo model
    path = example_images()[0]
    policy = "native:1024"
    pixels = prepare(path, policy)[0]
    with Image.open(path) as im:
        pil = im.copy()
    by_path, by_pil, by_tensor = tok.encode([path, pil, pixels], policy=parse_policy(policy))
    assert torch.equal(by_path, by_tensor) and torch.equal(by_pil, by_tensor)
    assert by_tensor.shape[-1] == 4 and by_tensor.shape[0] * 16 == pixels.shape[1]
    feats = tok.embed([by_tensor])[0]
    assert feats.shape == (by_tensor.shape[0] * by_tensor.shape[1], tok.config.vit.width)
