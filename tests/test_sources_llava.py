"""LLaVA conversation files as encode inputs: ids are the image paths as written, each image once,
and the offline MLLM stage then finds every image of the file in the store."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viq.config import tiny_config
from viq.data import make_shapes_dataset
from viq.data.conversations import load_samples
from viq.demo import random_model_dir
from viq.encode import EncodeOptions, encode_to_store
from viq.errors import ConfigError
from viq.mllm.offline import store_key
from viq.sources import InputOptions, SourceReader, collect_sources
from viq.store import CodeStore
from viq.tokenizer import load_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mllm-offline.yaml"


def png(path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def turn(text="<image>\nWhat is it?"):
    return [{"from": "human", "value": text}, {"from": "gpt", "value": "a thing"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    random_model_dir(root / "models" / "viq-tiny", tiny_config("16k"), seed=0)
    return root


def test_ids_are_paths_as_written_and_each_image_once(tmp_path):
    images = tmp_path / "images"
    png(images / "00000" / "000000001.jpg", 1)  # content is PNG; the name is what matters
    png(images / "00000" / "000000002.jpg", 2)
    packed = tmp_path / "images" / "pack.bin"
    a, b = png(tmp_path / "a.png", 3), png(tmp_path / "b.png", 4)
    packed.write_bytes(a + base64.b64encode(b))
    samples = [
        {"id": "conv-1", "image": "00000/000000001.jpg", "conversations": turn()},
        {"id": "conv-2", "image": "00000/000000001.jpg", "conversations": turn()},  # same image again
        {"id": "conv-3", "image": [{"img_path": "00000/000000002.jpg"}, {"patch": "pack.bin", "start_num": 0,
                                                                          "size": len(a)}],
         "conversations": turn("<image><image> two?")},
        {"id": "conv-4", "image": {"patch": "pack.bin", "start_num": len(a), "size": len(base64.b64encode(b)),
                                   "image_encoding": "base64"}, "conversations": turn()},
        {"id": "text-only", "conversations": turn("hi")},
    ]
    data = tmp_path / "meta" / "llava.json"
    data.parent.mkdir()
    data.write_text(json.dumps(samples))
    got = collect_sources([str(data)], options=InputOptions(image_root=images))
    assert [s.id for s in got] == ["00000/000000001.jpg", "00000/000000002.jpg", "pack.bin@0", f"pack.bin@{len(a)}"]
    reader = SourceReader()
    assert reader.read(got[2]) == a and reader.read(got[3]) == b
    assert got[0].path == images / "00000" / "000000001.jpg"
    # .jsonl with the same rows: the conversation ids are not the image ids
    jsonl = tmp_path / "meta" / "llava.jsonl"
    jsonl.write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert [s.id for s in collect_sources([str(jsonl)], options=InputOptions(image_root=images))] == [s.id for s in got]
    # without --image-root paths are relative to the file's folder, as the training loader reads them
    assert collect_sources([str(data)])[0].path == data.parent / "00000" / "000000001.jpg"


def test_bad_llava_files_are_usage_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="list of samples"):
        collect_sources([str(bad)])
    bad.write_text(json.dumps([{"conversations": turn("hi")}]))
    with pytest.raises(ConfigError, match="no sample references an image"):
        collect_sources([str(bad)])
    bad.write_text(json.dumps([{"image": "https://x.org/a.jpg", "conversations": turn()}]))
    with pytest.raises(ConfigError, match="img2dataset"):
        collect_sources([str(bad)])


def test_encode_llava_then_offline_stage_finds_every_image(model, tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, n_train=6, n_val=2, seed=3, min_side=32, max_side=48, resize=None)
    # the encoder reads the conversation files themselves: only referenced images, ids as written
    p = subprocess.run([sys.executable, "-m", "viqctl", "encode", str(data / "train.jsonl"), str(data / "val.jsonl"),
                        "--image-root", str(data), "--model", str(model / "models" / "viq-tiny"),
                        "--out", str(data / "codes"), "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    store = CodeStore(data / "codes")
    for split in ("train", "val"):
        for s in load_samples(data / f"{split}.jsonl", check_files=False):
            assert all(store_key(r) in store for r in s.images)
    assert len(store) == 8

    from viq.train.recipe import load_recipe
    from viq.train.run import train

    recipe = load_recipe(RECIPE, "tiny", [f"paths.models={model / 'models'}", f"paths.data={data}",
                                          f"run.output_dir={tmp_path / 'run'}", "data.val_path=${data}/val.jsonl",
                                          "optim.max_steps=1", "runtime.save_every=1"])
    res = train(recipe, eval_limit=2)
    assert res.steps == 1


def test_resume_after_interrupt(model, tmp_path):
    tok = load_tokenizer(model / "models" / "viq-tiny", parts=("encoder",), device="cpu")
    for i in range(6):
        png(tmp_path / "img" / f"{i}.png", i)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"img/{i}.png", "conversations": turn()}) + "\n" for i in range(6)))
    sources = collect_sources([str(data)])

    class Stop(Exception):
        pass

    def stop(n, seen=[]):
        seen.append(n)
        if sum(seen) >= 3:
            raise Stop

    opts = EncodeOptions(workers=1, rows_per_shard=1, token_budget=4)
    with pytest.raises(Stop):
        encode_to_store(sources, tok, tmp_path / "s", {}, opts, progress=stop)
    again = encode_to_store(sources, tok, tmp_path / "s", {}, opts)
    assert again.skipped >= 2 and again.skipped + again.encoded == 6
    assert CodeStore(tmp_path / "s").ids() == [f"img/{i}.png" for i in range(6)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_list_is_read_one_sample_at_a_time(chunk):
    from viq.sources.llava import iter_json_list

    items = [{"image": "a/[b].jpg", "n": 12345, "s": "x, y ] { \" }"}, [1, 2], 3.25, "t", None, {"deep": {"k": [{}]}}]
    text = " \n[ " + " ,\n ".join(json.dumps(i) for i in items) + " ]\n "
    assert list(iter_json_list(io.StringIO(text), chunk)) == items
    assert list(iter_json_list(io.StringIO("[]"), chunk)) == []
    assert list(iter_json_list(io.StringIO("[123456789]"), chunk)) == [123456789]  # a number across chunks
    for bad in ['{"a": 1}', '[{"a": 1} {"b": 2}]', '[{"a": 1}', '[1, 2] x', '[{"a": }]']:
        with pytest.raises(ValueError):
            list(iter_json_list(io.StringIO(bad), chunk))
