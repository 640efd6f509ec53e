"""Small models made in code: random-weight tiny tokenizers for tests and first runs.

A model written here is marked ``"random_weights": true`` in its config.json so that every command
that loads it can say plainly that its codes carry no meaning.
"""

from __future__ import annotations

import torch

from viq.config import ViQConfig, tiny_config
from viq.model.viq_model import ViQModel
from viq.weights.save import save_viq


def random_model_dir(out_dir, config: ViQConfig | None = None, seed: int = 0) -> dict:
    """Write a viq weights directory with seeded random weights."""
    cfg = config or tiny_config("16k")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ViQModel(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return save_viq(model.state_dict(), cfg, out_dir,
                    {"random_weights": True, "seed": seed,
                     "note": "random initialisation, not trained: codes and reconstructions carry no meaning"})


def is_random(meta_source: dict | None) -> bool:
    return bool(meta_source and meta_source.get("random_weights"))
