"""Starting weights in every supported layout, detected automatically and applied with a report."""

from pathlib import Path

import torch

from viq.config import ViTConfig
from viq.model.student import new_vit
from viq.train.model import LossPlan, TrainModel
from viq.train.recipe import load_recipe
from viq.train.run import apply_init, build_student, detect_format, init_tensors
from viq.weights import keymaps
from viq.weights.save import save_viq

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def recipe(tmp_path, ckpt, fmt="auto"):
    return load_recipe(TINY, None, [f"paths.data={tmp_path}", f"init.ckpt={ckpt}", f"init.format={fmt}"])


def fresh_model(r):
    return TrainModel(build_student(r, r.model), None, LossPlan({}, None, False, False, True))


def test_siglip2_openclip_checkpoint(tmp_path):
    r = recipe(tmp_path, tmp_path / "oc.bin")
    vit = r.model.vit
    src = new_vit(ViTConfig(**{**vit.model_dump(), "pos_grid": 6}), True, seed=9)
    torch.save({**{f"visual.trunk.{k}": v for k, v in src.state_dict().items()}, "logit_scale": torch.ones(())},
               tmp_path / "oc.bin")
    assert detect_format(tmp_path / "oc.bin") == "siglip2_openclip"
    tensors, fmt, notes = init_tensors(r, tmp_path / "oc.bin")
    model = fresh_model(r)
    rep = apply_init(model, tensors, False, "oc.bin", fmt, notes)
    assert rep.loaded == len(src.state_dict()) and not rep.dropped and "pos_embed 6x6 -> 16x16 (bicubic)" in rep.notes
    assert torch.equal(model.student.vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert any(k.startswith("student.head.") for k in rep.fresh)


def test_reference_training_layout(tmp_path):
    r = recipe(tmp_path, tmp_path / "vision_tower.pth")
    donor = fresh_model(r)
    torch.manual_seed(1)
    for p in donor.parameters():
        p.data.normal_()
    back = keymaps.reverse(keymaps.ENCODER_FILE)
    ref = {}
    for k, v in donor.student.state_dict().items():
        name = keymaps.rename(k, back)
        if name is None or ".vae.encoder." in name or name.startswith("vae_head.vae.quant_conv"):
            continue
        name = name.replace("fusion_block.", "dualvq_head.").replace("vae_", "movq_")
        ref[keymaps.TRAIN_PREFIX + name] = v.clone()
    ref["base_model.model.model.vision_tower.vision_tower_teacher.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(ref, tmp_path / "vision_tower.pth")
    assert detect_format(tmp_path / "vision_tower.pth") == "reference"
    tensors, fmt, notes = init_tensors(r, tmp_path / "vision_tower.pth")
    model = fresh_model(r)
    rep = apply_init(model, tensors, False, "vision_tower.pth", fmt, notes)
    assert any("teacher" in n for n in notes) and not rep.reinitialised
    assert torch.equal(model.student.head.project_in.weight, donor.student.head.project_in.weight)
    assert torch.equal(model.student.vit.pos_embed, donor.student.vit.pos_embed)
    assert torch.equal(model.student.drawer.latent_conv.weight, donor.student.drawer.latent_conv.weight)


def test_viq_weights_directory(tmp_path):
    r = recipe(tmp_path, tmp_path / "viq")
    donor = fresh_model(r)
    save_viq(donor.student.viq_state(), r.model, tmp_path / "viq")
    assert detect_format(tmp_path / "viq") == "viq"
    tensors, fmt, notes = init_tensors(r, tmp_path / "viq")
    model = fresh_model(r)
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_()
    rep = apply_init(model, tensors, False, "viq", fmt, notes)
    assert fmt == "viq" and rep.loaded == len(tensors)
    assert torch.equal(model.student.head.merge_slots.fc1.weight, donor.student.head.merge_slots.fc1.weight)


def test_quantizer_projections_take_the_models_names():
    """A bottleneck (2-1) and the head's FSQ projections (2-2) are one role across checkpoints."""
    from viq.train.build import quantizer_projections

    fsq = {"student.head.project_in.weight": torch.zeros(5, 4), "student.vit.pos_embed": torch.zeros(1)}
    bottleneck_model = {"student.bottleneck.project_in.weight": 0, "student.head.project_in.weight": 0}
    assert set(quantizer_projections(fsq, bottleneck_model)) == {"student.bottleneck.project_in.weight",
                                                                  "student.vit.pos_embed"}
    old = {"student.bottleneck.project_in.weight": torch.zeros(8, 4)}
    assert set(quantizer_projections(old, {"student.head.project_in.weight": 0})) == {"student.head.project_in.weight"}
    assert quantizer_projections(old, bottleneck_model) is old  # already in the model's names
