"""Checkpoints: atomic (a failed save leaves nothing), exact round trips, no unpickling, pruning."""

import json
import random

import numpy as np
import pytest
import torch

from viq.errors import WeightsError
from viq.train import checkpoint as ckpt


def _optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_round_trips():
    _, opt = _optimizer()
    tensors, meta = ckpt.flatten_optimizer(opt.state_dict())
    json.dumps(meta)  # the non-tensor part is plain JSON
    back = ckpt.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    for pid, entry in ref["state"].items():
        for k, v in entry.items():
            assert torch.equal(back["state"][pid][k], v)
    model2, opt2 = _optimizer()
    opt2.load_state_dict(back)  # accepted by torch


def test_rng_round_trips():
    tensors, meta = ckpt.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.restore_rng(tensors, json.loads(json.dumps(meta)))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_write_read_and_prune(tmp_path):
    model, opt = _optimizer()
    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, model.state_dict(), opt.state_dict(), {"step": step})
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000001", "step-00000002", "step-00000003"]
    gone = ckpt.prune(tmp_path, 2)
    assert [p.name for p in gone] == ["step-00000001"]
    c = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert c.state["step"] == 3 and torch.equal(c.model["0.weight"], model.state_dict()["0.weight"])
    assert c.optimizer_state()["state"][0]["exp_avg"].shape == (3, 4)
    # nothing in a checkpoint needs unpickling
    assert {p.suffix for p in c.path.iterdir()} <= {".safetensors", ".json"}


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, opt = _optimizer()
    ckpt.write_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), {"step": 1})
    real = ckpt.save_json

    def crash(obj, path):
        if path.name == ckpt.STATE_FILE:
            raise OSError("disk full (simulated)")
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_json", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.write_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), {"step": 2})
    assert not ckpt.step_dir(tmp_path, 2).exists() and not ckpt.tmp_dir(tmp_path, 2).exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"


def test_crash_mid_write_is_ignored_and_replaced(tmp_path):
    model, opt = _optimizer()
    ckpt.write_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), {"step": 1})
    tmp = ckpt.begin(tmp_path, 2)  # a process killed while writing step 2
    ckpt.save_tensors(model.state_dict(), tmp / "model.safetensors")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    with pytest.raises(WeightsError, match="incomplete"):
        ckpt.commit(tmp, tmp_path, 2)
    ckpt.write_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), {"step": 2})  # the next save cleans up
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002" and not ckpt.tmp_dir(tmp_path, 2).exists()
    with pytest.raises(WeightsError, match="not a complete checkpoint"):
        ckpt.read_checkpoint(tmp_path / "nowhere")


def test_same_step_saved_twice_is_replaced(tmp_path):
    model, opt = _optimizer()
    ckpt.write_checkpoint(tmp_path, 4, model.state_dict(), opt.state_dict(), {"step": 4, "v": 1})
    ckpt.write_checkpoint(tmp_path, 4, model.state_dict(), opt.state_dict(), {"step": 4, "v": 2})
    assert ckpt.read_checkpoint(ckpt.step_dir(tmp_path, 4)).state["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]
