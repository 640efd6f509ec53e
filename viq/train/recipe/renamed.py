"""Keys of the recipe layout before the architecture moved into ``model:`` (viq.config.ViQConfig).

A recipe written for that layout gets one line per old key saying where it went, rather than an
"unknown key" whose nearest valid name is unrelated.
"""

from __future__ import annotations

#: old dotted key -> where it lives now.
MOVED = {
    "model.init_ckpt": "init.ckpt",
    "model.init_format": "init.format",
    "model.init_stage": "init.stage",
    "model.reinit_mismatched": "init.reinit_mismatched",
    "model.trainable": "freeze.vit (inverted: trainable: false is freeze.vit: true)",
    "model.freeze_mlp_and_norm": "freeze.vit_mlp_and_norm",
    "model.train_attn_pool": "freeze.attn_pool (inverted)",
    "head.quantizer.type": "quantizer.type",
    "head.quantizer.levels": "model.head.levels",
    "head.quantizer.codebook_size": "quantizer.codebook_size",
    "head.quantizer.bottleneck_dim": "quantizer.bottleneck_dim",
    "head.quantizer.limit": "quantizer.limit",
    "head.quantizer.pre_attn_blocks": "model.head.fsq_blocks",
    "head.quantizer.attn_dim": "model.head.fsq_attn_dim",
    "head.pre_blocks": "model.head.pre_blocks",
    "head.residual_mlps": "model.head.residual_mlps",
    "head.token_shuffle": "model.head.slots (true = 4, false = 1)",
    "head.freeze": "freeze.head",
    "head.freeze_pre_blocks": "freeze.head_pre_blocks",
    "decoder.adapter_blocks": "model.drawer.adapter_blocks",
    "decoder.latent_upsample": "model.drawer.latent_upsample",
    "decoder.pixel": "model.pixel_decoder",
}
#: old dotted key -> why it is gone (the model always does what it said when true).
REMOVED = {
    "head.quantizer.rope2d": "the FSQ blocks always use RoPE-2D",
    "head.layernorm_trick": "always on",
    "decoder.adapter_heads": "the adapter uses the ViT's heads",
}


def moved_keys(data: dict) -> list[str]:
    """One line per key of the old layout found in a merged recipe dict."""
    lines = []
    if "head" in data and not isinstance(data["head"], dict):
        lines.append("head: null: the head section is gone; stage 1 (no head) is now quantizer: null")
    for old in (*MOVED, *REMOVED):
        node = data
        for part in old.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            lines.append(f"{old} moved to {MOVED[old]}" if old in MOVED else f"{old} is gone ({REMOVED[old]}): remove it")
    if lines:
        lines.append("(model: is now the architecture exactly as config.json stores it; see `viqctl recipes cp "
                     "fsq16k.yaml` for the current layout)")
    return lines
