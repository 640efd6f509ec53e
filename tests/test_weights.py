"""Strict loading: every tensor filled or a clear error listing the keys; no pickled code runs."""

import json
import shutil

import pytest
import torch

from conftest import FIXTURES, fixture_config, reference_dir_with_config, reseal
from viq.config import giant_config, so400m_config
from viq.errors import KeyMismatchError, WeightsError
from viq.tokenizer import load_tokenizer
from viq.weights.formats import build_empty, infer_reference_config, load_state


def copy_reference(tmp_path, size="16k"):
    dst = tmp_path / f"converted_{size}"
    shutil.copytree(FIXTURES / f"converted_{size}", dst)
    (dst / "config.json").write_text(json.dumps({"model": fixture_config(size).model_dump(mode="json")}))
    return dst


def edit(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def test_missing_key_is_an_error_listing_it(tmp_path):
    d = copy_reference(tmp_path)
    edit(d / "model_viq_fsq_16k.pth", lambda sd: sd.pop("fusion_block.vq_low.project_in.weight"))
    with pytest.raises(KeyMismatchError) as e:
        load_tokenizer(d, parts=("encoder",), device="cpu")
    assert "fusion_block.vq_low.project_in.weight" not in e.value.missing  # listed in viq names
    assert "head.project_in.weight" in e.value.missing
    assert "missing (1)" in str(e.value)
    assert "head.project_in.weight (file: fusion_block.vq_low.project_in.weight)" in str(e.value)


def test_unexpected_key_is_an_error(tmp_path):
    d = copy_reference(tmp_path)
    edit(d / "embedder.pth", lambda sd: sd.__setitem__("projector_9.weight", torch.zeros(2)))
    with pytest.raises(KeyMismatchError) as e:
        load_tokenizer(d, parts=("decoder",), device="cpu")
    assert "projector_9.weight" in str(e.value)


def test_shape_mismatch_is_an_error(tmp_path):
    d = copy_reference(tmp_path)
    edit(d / "index_drawer.pth", lambda sd: sd.__setitem__("vae_head.conv_out.bias", torch.zeros(3)))
    with pytest.raises(KeyMismatchError, match="shape mismatch"):
        load_tokenizer(d, parts=("drawer",), device="cpu")


def test_wrong_codebook_levels_refused(tmp_path):
    d = copy_reference(tmp_path)
    edit(d / "embedder.pth", lambda sd: sd.__setitem__("ori_codebook.weight", sd["ori_codebook.weight"].flip(0)))
    with pytest.raises(WeightsError, match="codebook does not match"):
        load_tokenizer(d, parts=("decoder",), device="cpu")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    d = copy_reference(tmp_path)
    torch.save({"x": Evil()}, d / "embedder.pth")
    with pytest.raises(WeightsError, match="never unpickles"):
        load_tokenizer(d, parts=("decoder",), device="cpu")
    assert "pwned" not in capsys.readouterr().out


def test_not_a_weights_dir(tmp_path):
    with pytest.raises(WeightsError, match="not a ViQ weights directory"):
        load_tokenizer(tmp_path, device="cpu")
    from viq.errors import ViQError

    with pytest.raises(ViQError, match="nope"):
        load_tokenizer(tmp_path / "nope", device="cpu")


def test_half_precision_files_load_exactly(tmp_path):
    d = reference_dir_with_config(tmp_path, "16k")
    _, state, _ = load_state(d, parts=("encoder",))
    raw = torch.load(FIXTURES / "converted_16k" / "model_viq_fsq_16k.pth", weights_only=True)
    assert raw["pos_embed"].dtype == torch.float16
    tok = load_tokenizer(d, parts=("encoder",), device="cpu", dtype="float32")
    assert torch.equal(tok.model.vit.pos_embed, raw["pos_embed"].float())


def test_viq_format_round_trip_and_strictness(tmp_path):
    d = reference_dir_with_config(tmp_path, "64k")
    tok = load_tokenizer(d, parts=("encoder", "pool", "decoder", "drawer"), device="cpu")
    out = tmp_path / "viq"
    meta = tok.save_pretrained(out)
    assert set(meta["parts"]) == {"encoder", "pool", "decoder", "drawer"}
    tok2 = load_tokenizer(out, parts=("encoder", "decoder", "drawer"), device="cpu")
    for k, v in tok2.model.state_dict().items():
        assert torch.equal(v, tok.model.state_dict()[k]), k
    assert tok2.report.fingerprints["decoder"] == tok.report.fingerprints["decoder"]
    # a tampered part file with a missing key fails strictly
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "decoder.safetensors")
    sd.pop("head.post_shift")
    save_file(sd, out / "decoder.safetensors")
    from viq.errors import IntegrityError

    with pytest.raises(IntegrityError, match="decoder.safetensors"):  # its digest no longer matches
        load_tokenizer(out, parts=("decoder",), device="cpu")
    reseal(out)  # re-recorded digests: the key check itself still refuses it
    with pytest.raises(KeyMismatchError, match="head.post_shift"):
        load_tokenizer(out, parts=("decoder",), device="cpu")



def test_viq_config_beside_reference_files_names_their_architecture(tmp_path):
    """The config.json that `viqctl convert` writes may be copied beside .pth files of another
    architecture: it then names the architecture and the .pth files are loaded (parts or not)."""
    d = reference_dir_with_config(tmp_path, "16k")
    meta = load_tokenizer(d, parts=("encoder",), device="cpu").save_pretrained(tmp_path / "viq")
    img = torch.rand(3, 32, 48) * 2 - 1
    want = load_tokenizer(d, parts=("encoder",), device="cpu").encode([img])[0]
    for with_parts in (True, False):
        cfg = dict(meta) if with_parts else {k: v for k, v in meta.items() if k != "parts"}
        (d / "config.json").unlink()
        (d / "config.json").write_text(json.dumps(cfg))
        tok = load_tokenizer(d, parts=("encoder",), device="cpu")
        assert tok.report.layout == "reference"
        assert torch.equal(tok.encode([img])[0], want)


@pytest.mark.parametrize("make,label", [(giant_config, "giant"), (so400m_config, "so400m")])
def test_released_shapes_are_recognised_without_config(make, label):
    cfg = make("8k")
    shapes = build_empty(cfg, ("encoder",)).state_dict()
    got, name = infer_reference_config(shapes, "8k", None)
    assert name == f"{label} 8k" and got == cfg
    with pytest.raises(WeightsError, match="FSQ size"):
        infer_reference_config(shapes, None, None)


def test_giant_parameter_counts_match_reference_spec():
    m = build_empty(giant_config("16k"))
    n = lambda prefix: sum(p.numel() for k, p in m.named_parameters() if k.startswith(prefix))
    assert n("vit.patch_embed") + n("vit.pos_embed") == 26_347_008
    assert n("vit.blocks") == 1_133_260_800
    assert n("vit.norm") + n("vit.attn_pool") == 28_333_056
    assert n("head.") == 277_003_013
    assert n("drawer.adapter") == 89_719_296
    assert n("drawer.latent") + n("drawer.vae") == 887_872 + 73_295_603
