"""Key maps between the published ViQ file layouts and viq's own parameter names.

The reference names (``fusion_block.vq_low_pre_token_shuffle_head``...) live only here. Each map
is an ordered list of (reference prefix, viq prefix); the first matching prefix wins.
"""

from __future__ import annotations

#: converted encoder file ``model_viq_fsq_<size>.pth``.
ENCODER_FILE = [
    ("pos_embed", "vit.pos_embed"),
    ("patch_embed.", "vit.patch_embed."),
    ("blocks.", "vit.blocks."),
    ("norm.", "vit.norm."),
    ("attn_pool.", "vit.attn_pool."),
    ("fusion_block.vq_low_preprocess_layers.", "head.pre_blocks."),
    ("fusion_block.vq_low_pre_token_shuffle_head.", "head.expand_slots."),
    ("fusion_block.vq_low_post_token_shuffle_head.", "head.slot_mlp."),
    ("fusion_block.vq_low.fsq_pre_attn.", "head.fsq_blocks."),
    ("fusion_block.vq_low.project_in.", "head.project_in."),
    ("fusion_block.vq_low.project_out.", "head.project_out."),
    ("fusion_block.vq_low_inverse_token_shuffle_head.", "head.merge_slots."),
    ("fusion_block.vq_low_postprocess_layers.", "head.post_mlps."),
    ("fusion_block.vq_low_norm_trick_post_quantize_affine_weight", "head.post_scale"),
    ("fusion_block.vq_low_norm_trick_post_quantize_affine_bias", "head.post_shift"),
    ("vae_preprocess_layers.", "drawer.adapter."),
    ("vae_head.conv_norm_out.", "drawer.latent_norm."),
    ("vae_head.conv_out.", "drawer.latent_conv."),
    ("vae_head.vae.decoder.", "drawer.vae.decoder."),
    ("vae_head.vae.post_quant_conv.", "drawer.vae.post_quant_conv."),
]

#: ``embedder.pth`` and the projector half of ``index_drawer.pth``.
EMBEDDER_FILE = [
    ("ori_codebook.weight", "head.codebook"),
    ("projector_1.", "head.project_out."),
    ("projector_2.", "head.merge_slots."),
    ("projector_3.", "head.post_mlps."),
    ("_weight", "head.post_scale"),
    ("_bias", "head.post_shift"),
]

DRAWER_FILE = EMBEDDER_FILE + [m for m in ENCODER_FILE if m[0].startswith("vae_")]

#: published tensors that inference never uses; dropped on purpose and reported, never silently.
UNUSED_IN_REFERENCE = {
    "vae_head.vae.encoder.": "Qwen-Image VAE encoder (not needed to draw)",
    "vae_head.vae.quant_conv.": "Qwen-Image VAE quant_conv (not needed to draw)",
}

#: training checkpoint (``vision_tower.pth``) -> converted-file names, applied before ENCODER_FILE.
TRAIN_PREFIX = "base_model.model.model.vision_tower.vision_tower."
TRAIN_RENAMES = [("dualvq_head.", "fusion_block."), ("movq_", "vae_"), ("vq_low.fsq.", "vq_low.")]

#: training-checkpoint keys a converter drops, by group (matched on the key after TRAIN_PREFIX).
TRAIN_DROPPED_GROUPS = {
    "teacher": lambda k: k.startswith("base_model.model.model.vision_tower.vision_tower_teacher."),
    "projector": lambda k: ".mm_projector." in k or k.startswith("base_model.model.model.mm_projector"),
    "perceptual loss": lambda k: "perceptual_loss" in k,
    "VAE CPU copy": lambda k: "vae_cpu" in k,
    "high branch": lambda k: ".vq_high" in k,
    "step counter": lambda k: k.endswith("global_step"),
    "FSQ buffers": lambda k: k.endswith(("._levels", "._basis", "implicit_codebook")),
    "zero scalars": lambda k: k.endswith(".zero") or k.endswith("vision_tower.zero"),
}


def rename(key: str, mapping: list[tuple[str, str]]) -> str | None:
    """Reference key -> viq key, or None when no prefix matches."""
    for src, dst in mapping:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def reverse(mapping: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(dst, src) for src, dst in mapping]


def unused_group(key: str) -> str | None:
    for prefix, label in UNUSED_IN_REFERENCE.items():
        if key.startswith(prefix):
            return label
    return None
