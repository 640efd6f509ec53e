import json
import os
from pathlib import Path

import pytest
import torch

from viq.config import DrawerConfig, HeadConfig, VAEConfig, ViQConfig, ViTConfig

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "reference-parity"
FIXTURES = FIXTURES.resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_config(size: str) -> ViQConfig:
    """The architecture of the parity fixtures, from their model-config.json."""
    mc = json.loads((FIXTURES / "model-config.json").read_text())
    v = mc["vit"]
    return ViQConfig(
        name=f"fixture-{size}",
        vit=ViTConfig(width=v["width"], depth=v["depth"], heads=v["heads"], mlp_hidden=v["mlp_hidden"],
                      patch=v["patch"], pos_grid=v["pos_grid"][0]),
        head=HeadConfig(levels=mc["head"]["levels"][size], fsq_attn_dim=mc["head"]["fsq_block"]["reduced_dim"]),
        drawer=DrawerConfig(vae=VAEConfig(**mc["vae"]["kwargs"])),
    )


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES} (expected ../shared beside the repo)")
    return FIXTURES


def reference_dir_with_config(tmp_path: Path, size: str) -> Path:
    """A copy-free reference-layout directory (symlinks) plus a viq config.json naming the architecture."""
    src = FIXTURES / f"converted_{size}"
    dst = tmp_path / f"converted_{size}"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps({"model": fixture_config(size).model_dump(mode="json")}))
    return dst
