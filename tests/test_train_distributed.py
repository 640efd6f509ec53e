"""Two CPU processes launched by ``accelerate launch`` (gloo): each trains on its own shard of the data.

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` runs its torchrun
launcher and the processes come up as MULTI_CPU (``--cpu --num_processes 2`` would start only one).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from viq.data import make_shapes_dataset

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
OFFLINE = Path(__file__).resolve().parents[1] / "recipes" / "mllm-offline.yaml"

WORKER = """
import json, os, sys
from pathlib import Path
from viq.train.recipe import load_recipe
from viq.train.run import train

out = Path(sys.argv[1])
seen = []
def progress(event):
    if event.kind == "step":
        seen.append({"step": event.step, "samples": event.sample_indices, "loss": event.metrics["loss"]})
rank = int(os.environ["RANK"])
stage = None if sys.argv[3] == "-" else sys.argv[3]
recipe = load_recipe(sys.argv[2], stage, sys.argv[4:])
result = train(recipe, progress=progress, eval_limit=4, eval_at_start=False)
(out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "steps": result.steps,
                                                  "processes": result.metrics["processes"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(tmp_path: Path, recipe: Path, stage, overrides: list[str]) -> list[dict]:
    """Run the worker under ``accelerate launch`` with two CPU processes; each rank's report."""
    (tmp_path / "worker.py").write_text(WORKER)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path), str(recipe),
           stage or "-", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_train_on_disjoint_shards(tmp_path):
    make_shapes_dataset(tmp_path / "shapes", n_train=16, n_val=4, seed=2)
    overrides = [f"paths.data={tmp_path / 'shapes'}", f"run.output_dir={tmp_path / 'runs'}", "optim.max_steps=2",
                 "data.micro_batch_size=2", "runtime.save_every=2", "runtime.log_every=1", "data.num_workers=0"]
    ranks = launch_two(tmp_path, TINY, None, overrides)
    assert all(r["steps"] == 2 and r["processes"] == 2 for r in ranks)
    shards = [{i for s in r["seen"] for i in s["samples"]} for r in ranks]
    assert all(len(s) == 4 for s in shards)  # 2 steps x 2 samples each
    assert not shards[0] & shards[1]  # really sharded: no sample seen by both processes
    # one model: the checkpoint and outputs exist once, written by the main process
    assert (tmp_path / "runs" / "checkpoints" / "step-00000002" / "rng-rank1.safetensors").is_file()
    assert (tmp_path / "runs" / "viq" / "config.json").is_file()


def test_two_processes_train_the_offline_stage_on_disjoint_shards(tmp_path):
    """The MLLM-on-codes stage under DDP: each rank reads its own samples, one model is written."""
    from viq.config import tiny_config
    from viq.demo import random_model_dir
    from viq.encode import EncodeOptions, encode_to_store
    from viq.sources import collect_sources
    from viq.tokenizer import load_tokenizer

    random_model_dir(tmp_path / "models" / "viq-tiny", tiny_config("16k"), seed=0)
    data = tmp_path / "data"
    make_shapes_dataset(data, n_train=16, n_val=0, seed=1, min_side=32, max_side=64, resize=None)
    tok = load_tokenizer(tmp_path / "models" / "viq-tiny", parts=("encoder",), device="cpu")
    encode_to_store(collect_sources([str(data)]), tok, data / "codes", {}, EncodeOptions(workers=1))
    overrides = [f"paths.models={tmp_path / 'models'}", f"paths.data={data}", f"run.output_dir={tmp_path / 'runs'}",
                 "optim.max_steps=2", "optim.grad_accum=1", "runtime.save_every=2", "runtime.log_every=1"]
    ranks = launch_two(tmp_path, OFFLINE, "tiny", overrides)
    assert all(r["steps"] == 2 and r["processes"] == 2 for r in ranks)
    for a, b in zip(ranks[0]["seen"], ranks[1]["seen"]):  # step by step (a step may start a new epoch)
        assert a["step"] == b["step"] and a["samples"] and not set(a["samples"]) & set(b["samples"])
    assert ranks[0]["seen"][0]["loss"] != ranks[1]["seen"][0]["loss"]  # different data on each rank
    out = tmp_path / "runs" / "tiny"
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-00000002").is_dir()
