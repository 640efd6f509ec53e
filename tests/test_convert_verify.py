"""convert: the training-layout fixture becomes weights that reproduce the reference outputs;
strict about missing keys; dropped keys reported. verify: passes on good weights, fails on tampered."""

import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_config, reference_dir_with_config, reseal, viqctl_in_process
from viq.errors import ConfigError, KeyMismatchError, WeightsError
from viq.tokenizer import load_tokenizer
from viq.train.export import convert_step
from viq.weights.convert import convert

TRAIN = FIXTURES / "train-layout" / "vision_tower.pth"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "viq-16k"
    report = convert(TRAIN, out, config=fixture_config("16k"), reference_layout=True)
    return out, report


def test_converted_training_checkpoint_reproduces_reference_outputs(converted):
    out, _ = converted
    tok = load_tokenizer(out, parts=("encoder", "decoder", "drawer"), device="cpu")
    for case in ("native", "preproc"):
        data = np.load(FIXTURES / "results_16k" / f"case_{case}.npz")
        n = len([k for k in data if k.startswith("indices_")])
        pixels = [torch.from_numpy(data[f"pixel_values_{i}"][0]) for i in range(n)]
        codes = tok.encode_pixels(pixels)
        feats, lats = tok.embed(codes), tok.latents(codes)
        recons = tok.reconstruct(codes)
        for i in range(n):
            np.testing.assert_array_equal(codes[i].reshape(-1).numpy(), data[f"indices_{i}"].reshape(-1))
            ref = data[f"embed_feat_{i}"][0]
            assert np.abs(feats[i].numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
            ref = data[f"vae_latent_{i}"]
            assert np.abs(lats[i].numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
            assert np.abs(recons[i].numpy().astype(int) - data[f"recon_{i}"]).max() <= 1


def test_dropped_keys_are_reported_by_group(converted):
    _, report = converted
    groups = set(report.dropped)
    for g in ("teacher", "projector", "perceptual loss", "VAE CPU copy", "high branch", "step counter",
              "FSQ buffers", "zero scalars"):
        assert g in groups, g
    extras = sum(len(v) for g, v in report.dropped.items() if not g.startswith("Qwen-Image VAE"))
    assert extras == 42  # every extra key of the training file, none silently
    assert report.levels == [8, 8, 8, 6, 5]  # read from the checkpoint's _levels buffer
    assert report.adaptations == []  # shapes already right: no resize


def test_converted_equals_published_conversion_bit_for_bit(converted, tmp_path):
    out, _ = converted
    ours = load_tokenizer(out, parts=("encoder", "pool", "decoder", "drawer"), device="cpu").model.state_dict()
    ref = load_tokenizer(reference_dir_with_config(tmp_path, "16k"), parts=("encoder", "pool", "decoder", "drawer"),
                         device="cpu").model.state_dict()
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k


def test_missing_key_makes_convert_fail(tmp_path):
    sd = torch.load(TRAIN, weights_only=True)
    sd.pop("base_model.model.model.vision_tower.vision_tower.dualvq_head.vq_low_postprocess_layers.2.norm.weight")
    bad = tmp_path / "vision_tower.pth"
    torch.save(sd, bad)
    with pytest.raises(KeyMismatchError) as e:
        convert(bad, tmp_path / "out", config=fixture_config("16k"))
    assert "head.post_mlps.2.norm.weight" in str(e.value)
    assert not (tmp_path / "out" / "config.json").exists()


def test_levels_conflict_and_position_grid_adaptation(tmp_path):
    with pytest.raises(ConfigError, match="levels"):
        convert(TRAIN, tmp_path / "o1", size="64k", config=fixture_config("16k"))
    sd = torch.load(TRAIN, weights_only=True)
    key = "base_model.model.model.vision_tower.vision_tower.pos_embed"
    sd[key] = torch.randn(1, 64, 128, dtype=torch.float16)  # an 8x8 grid, as a 128-px pre-training would leave
    path = tmp_path / "vision_tower.pth"
    torch.save(sd, path)
    report = convert(path, tmp_path / "o2", config=fixture_config("16k"))
    assert report.adaptations == ["position grid 8x8 -> 16x16 (bicubic)"]
    tok = load_tokenizer(tmp_path / "o2", parts=("encoder",), device="cpu")
    assert tok.model.vit.pos_embed.shape == (1, 256, 128)
    # a 14x14 patch kernel (the reference's default patch size) is resized to 16x16, and said so
    pk = "base_model.model.model.vision_tower.vision_tower.patch_embed.proj.weight"
    assert sd[pk].shape[-2:] == (16, 16)
    sd[pk] = torch.randn(*sd[pk].shape[:2], 14, 14, dtype=sd[pk].dtype)
    torch.save(sd, path)
    report = convert(path, tmp_path / "o3", config=fixture_config("16k"))
    assert "patch kernel 14x14 -> 16x16 (bicubic)" in report.adaptations
    tok = load_tokenizer(tmp_path / "o3", parts=("encoder",), device="cpu")
    assert tok.model.vit.patch_embed.proj.weight.shape[-2:] == (16, 16)


cli = viqctl_in_process  # what the commands do; the entry point itself: test_cli_install.py


def test_verify_passes_then_fails_on_a_flipped_weight(converted, tmp_path):
    out, _ = converted
    p = cli("verify", out, "--against", out / "converted_16k", "--json", "--resize", "native:6144")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["ok"] and len(res["fingerprints"]) == 3
    assert {f["image"] for f in res["fingerprints"]} >= {"chelsea_320x240.jpg"}
    assert len({tuple(f["grid"]) for f in res["fingerprints"]}) == 3  # different sizes

    # flip one weight of a copy of the converted model
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "tampered"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("converted_*"))
    sd = load_file(bad / "decoder.safetensors")
    sd["head.post_mlps.1.mlp.fc1.weight"][0, 0] += 0.5
    save_file(sd, bad / "decoder.safetensors")
    from viq.weights.verify import example_images

    p = cli("verify", bad, "--against", out, "--resize", "native:4096", "--images", example_images()[0])
    assert p.returncode == 1
    assert "mismatch" in p.stdout and "decoder.safetensors" in p.stdout  # its sha256 no longer matches
    reseal(bad)  # digests re-recorded: the outputs themselves differ from the original's
    p = cli("verify", bad, "--against", out, "--resize", "native:4096", "--images", example_images()[0])
    assert p.returncode == 1
    assert "mismatch" in p.stdout and "features_abs_sum (decoder)" in p.stdout
    # --against the training checkpoint itself (converted in memory): the same fingerprints
    cfg = tmp_path / "cfg" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model": fixture_config("16k").model_dump(mode="json")}))
    p = cli("verify", out, "--against", TRAIN, "--config", cfg, "--resize", "native:1024",
            "--images", example_images()[0])
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli("verify", out, "--images", tmp_path / "nope.png")
    assert p.returncode == 2 and "nope.png" in p.stderr  # a usage error, not a failed check


def test_verify_catches_a_codebook_that_is_not_fsq(converted, tmp_path):
    """The full path never reads the stored codebook, so a table that differs from FSQ's fails verify
    on its own (no --against); one too far off is refused already at load."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = converted
    from viq.weights.verify import example_images

    img = example_images()[0]
    for delta, says in ((2 ** -10, "full path != split path"), (0.5, "codebook does not match")):
        bad = tmp_path / f"codebook-{delta}"
        shutil.copytree(out, bad, ignore=shutil.ignore_patterns("converted_*"))
        sd = load_file(bad / "decoder.safetensors")
        sd["head.codebook"] = sd["head.codebook"] + delta  # every row shifted: every code affected
        save_file(sd, bad / "decoder.safetensors")
        reseal(bad)  # past the digest check: the codebook checks themselves must catch it
        p = cli("verify", bad, "--resize", "native:1024", "--images", img)
        assert p.returncode == 1, p.stdout + p.stderr  # a failed check of the weights, not a usage error
        assert says in p.stdout



def test_convert_cli_json_summary(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model": fixture_config("16k").model_dump(mode="json")}))
    p = cli("convert", TRAIN, "--out", tmp_path / "o", "--config", cfg / "config.json", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["dropped"]["teacher"]["count"] == 8
    assert set(res["parts"]) == {"encoder", "pool", "decoder", "drawer"}
    p = cli("convert", tmp_path / "nothing.pth", "--out", tmp_path / "o2")
    assert p.returncode == 2 and "nothing.pth" in p.stderr
    # the spelling of the levels: several values after one --levels (the checkpoint's are 8 8 8 6 5)
    p = cli("convert", TRAIN, "--out", tmp_path / "o3", "--config", cfg / "config.json", "--levels", "8", "8", "8",
            "6", "5", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["levels"] == [8, 8, 8, 6, 5]
    p = cli("convert", TRAIN, "--out", tmp_path / "o4", "--levels", "8", "8", "8", "5", "5")
    assert p.returncode == 2 and "levels" in p.stderr  # conflicts with the checkpoint's own levels


def test_gather_levels():
    from viqctl.__main__ import gather_levels

    assert gather_levels(["convert", "x.pth", "--levels", "8", "8", "6", "--out", "o"]) == \
        ["convert", "x.pth", "--levels=8,8,6", "--out", "o"]
    assert gather_levels(["--levels", "8", "x.pth"]) == ["--levels", "8", "x.pth"]
    assert gather_levels(["encode", "8", "9"]) == ["encode", "8", "9"]


def test_convert_accepts_a_viq_training_run_folder(tmp_path):
    from viq.config import tiny_config
    from viq.demo import random_model_dir
    from viq.errors import WeightsError

    run = tmp_path / "run"
    random_model_dir(run / "viq", tiny_config("4k"), seed=3)
    (run / "training.json").write_text("{}")
    report = convert(run, tmp_path / "out")
    assert report.kind == "viq training run" and report.levels == [8, 8, 4, 4, 4]
    assert len(report.source_sha256) == 64
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["source"]["sha256"] == report.source_sha256  # the config records what it came from
    a = load_tokenizer(run / "viq", parts=("encoder", "decoder"), device="cpu").model.state_dict()
    b = load_tokenizer(tmp_path / "out", parts=("encoder", "decoder"), device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "training.json").write_text("{}")
    with pytest.raises(WeightsError, match="no finished weights"):
        convert(unfinished, tmp_path / "out2")


def test_convert_reexports_a_published_directory(tmp_path):
    """Input (c): the published inference layout re-exported to viq's format, tensor for tensor."""
    ref = reference_dir_with_config(tmp_path, "16k")
    report = convert(ref, tmp_path / "viq")
    assert report.kind == "reference inference layout" and len(report.source_sha256) == 64
    parts = ("encoder", "pool", "decoder", "drawer")
    a = load_tokenizer(ref, parts=parts, device="cpu").model.state_dict()
    b = load_tokenizer(tmp_path / "viq", parts=parts, device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_a_step_checkpoint_of_a_viq_run(tmp_path):
    """Input (b): any step of viq's own training run converts, and the last step gives exactly the
    weights the finished run exported."""
    from pathlib import Path

    from viq.data import make_shapes_dataset
    from viq.train import load_recipe
    from viq.train.run import train

    make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=2, seed=4)
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    recipe = load_recipe(tiny, overrides=[f"paths.data={tmp_path / 'shapes'}", f"run.output_dir={tmp_path / 'runs'}",
                                          "optim.max_steps=2", "runtime.save_every=1", "runtime.keep_last=2",
                                          "data.num_workers=0", "data.val_path=null",
                                          "runtime.eval_every=null"])
    res = train(recipe, eval_at_start=False)
    steps = sorted((res.out_dir / "checkpoints").glob("step-*"))
    assert [s.name for s in steps] == ["step-00000001", "step-00000002"]
    with pytest.raises(WeightsError, match="step checkpoint"):
        convert(steps[-1], tmp_path / "plain")  # inference-side convert reads no training checkpoints itself
    report = convert_step(steps[-1], tmp_path / "from-step")
    assert report.kind == "viq training checkpoint" and "step 2" in report.recognised
    parts = ("encoder", "pool", "decoder", "drawer")
    a = load_tokenizer(res.viq_dir, parts=parts, device="cpu").model.state_dict()
    b = load_tokenizer(tmp_path / "from-step", parts=parts, device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    early = convert_step(steps[0], tmp_path / "from-step-1")
    c = load_tokenizer(tmp_path / "from-step-1", parts=parts, device="cpu").model.state_dict()
    assert "step 1" in early.recognised and not all(torch.equal(a[k], c[k]) for k in a)  # it did train
    p = cli("convert", steps[0], "--out", tmp_path / "cli-step-1", "--json")  # the CLI passes the step reader
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kind"] == "viq training checkpoint"
