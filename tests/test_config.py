"""ViQConfig: the one architecture schema (config.json and a recipe's model: section)."""

import pytest
from pydantic import ValidationError

from viq.config import FSQ_PRESETS, ViQConfig, giant_config, preset_config, tiny_config


def test_arch_names_a_preset_and_other_keys_override_it():
    assert ViQConfig.model_validate({"arch": "giant"}).model_dump(exclude={"name"}) == \
        giant_config().model_dump(exclude={"name"})
    so = ViQConfig.model_validate({"arch": "so400m", "head": {"levels": "2k", "pre_blocks": 1}})
    assert (so.vit.width, so.vit.depth, so.head.levels, so.head.pre_blocks, so.head.fsq_blocks) == \
        (1152, 27, FSQ_PRESETS["2k"], 1, 3)
    # the tiny preset derives its MLP width from the ViT width, as tiny_config does
    assert ViQConfig.model_validate({"arch": "tiny", "vit": {"width": 96}}).vit == tiny_config(width=96).vit
    assert "arch" not in ViQConfig.model_validate({"arch": "tiny"}).model_dump()  # a dump stands on its own
    assert ViQConfig.model_validate(preset_config("tiny").model_dump()) == preset_config("tiny")


@pytest.mark.parametrize("data,where", [
    ({"vit": {"heads": 0}}, "heads"),
    ({"arch": "tiny", "vit": {"heads": 0}}, "heads"),
    ({"vit": {"depth": -1}}, "depth"),
    ({"head": {"slots": 0}}, "slots"),
    ({"head": {"levels": [8, 1]}}, "levels must be integers >= 2"),
    ({"head": {"levels": "3k"}}, "unknown FSQ size '3k'"),
    ({"drawer": {"group_norm_groups": 5}}, "group_norm_groups 5 does not divide vit.width"),
    ({"pixel_decoder": {"adapter_heads": 0}}, "adapter_heads"),
    ({"arch": "huge"}, "unknown preset 'huge'"),
    ({"arch": ["tiny"]}, "a preset name"),
])
def test_hostile_values_are_refused_naming_the_key(data, where):
    """config.json can come from anywhere: a zero or negative size is a clear error, never a crash later."""
    with pytest.raises(ValidationError, match=where.replace("(", r"\(").replace(".", r"\.")):
        ViQConfig.model_validate(data)
