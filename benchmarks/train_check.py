"""The training engine on the distributed back ends that need a GPU: optimizer steps counted per run.

    python benchmarks/train_check.py --out train_check.json      # one GPU: DeepSpeed ZeRO-1, FSDP2, plain
    python benchmarks/train_check.py --tiny                       # CPU: the plain run only (what tests run)

The tiny offline-MLLM recipe (a random tiny tokenizer, a code store made here, a tiny LLM with
LoRA) trains 3 optimizer steps with ``optim.grad_accum=2``, i.e. 6 micro-batches, once per back
end. Each run counts what really stepped: the DeepSpeed engine's model steps, or the wrapped
optimizer's ``step`` calls (plain and FSDP2), and must count 3; a back end that steps every
micro-batch would count 6. ``gpu_check.py`` runs this as its ``train_engines`` section.

DeepSpeed and FSDP2 each run in a fresh process (``--engine``) in a one-process distributed world
set up by environment variables, as ``torchrun --nproc_per_node 1`` would: accelerate keeps one
state per process (a second back end in the same process silently stays the first one's), and both
need a process group (without one, DeepSpeed looks for MPI and accelerate ignores the FSDP plugin).
Each run also records accelerate's ``distributed_type``, and is correct only on the intended one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("viq") is None:  # run from a checkout where viq is not installed (the GPU machine)
    sys.path.insert(0, str(ROOT))
RECIPES = ROOT / "recipes"
STEPS, ACCUM = 3, 2
#: accelerate's distributed_type each back end must really run under
EXPECTED_TYPE = {"plain": ("NO", "MULTI_GPU", "MULTI_CPU"), "deepspeed_zero1": ("DEEPSPEED",), "fsdp2": ("FSDP",)}
ISOLATED_TIMEOUT_S = 240


@contextlib.contextmanager
def counting(owner, name: str):
    """Count calls of ``owner.name`` (a method) while inside the block; the list holds each call's ``self``."""
    calls = []
    real = getattr(owner, name)

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield calls
    finally:
        setattr(owner, name, real)


def make_world(root: Path) -> Path:
    """A random tiny tokenizer (``models/viq-tiny``) and shapes data encoded into ``data/codes``."""
    from viq.config import tiny_config
    from viq.data import make_shapes_dataset
    from viq.encode import EncodeOptions, encode_to_store
    from viq.model.viq_model import ViQModel
    from viq.sources import collect_sources
    from viq.tokenizer import load_tokenizer
    from viq.weights.save import save_viq

    cfg = tiny_config("16k")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # encoder (to make the codes) and decoder (the offline stage's embedder) only: the drawer needs
        # diffusers, which the GPU machine's image lacks and this check never reads
        model = ViQModel(cfg, parts=("encoder", "decoder"))
    save_viq(model.state_dict(), cfg, root / "models" / "viq-tiny", {"random_weights": True, "seed": 0})
    make_shapes_dataset(root / "data", n_train=12, n_val=2, seed=4, min_side=32, max_side=32, resize=None)
    tok = load_tokenizer(root / "models" / "viq-tiny", parts=("encoder",), device="cpu")
    encode_to_store(collect_sources([str(root / "data")]), tok, root / "data" / "codes", {}, EncodeOptions(workers=1))
    return root


def run_engine(kind: str, root: Path, cuda: bool) -> dict:
    """One tiny offline run on back end ``kind`` (plain, deepspeed_zero1, fsdp2); steps counted."""
    from viq.train.recipe import load_recipe
    from viq.train.run import train

    extra = {"plain": [], "deepspeed_zero1": ["runtime.deepspeed_zero=1"], "fsdp2": ["runtime.fsdp=true"]}[kind]
    recipe = load_recipe(RECIPES / "mllm-offline.yaml", "tiny", [
        f"paths.models={root / 'models'}", f"paths.data={root / 'data'}", f"run.output_dir={root / 'runs' / kind}",
        "data.val_path=null", "llm.max_length=48", f"optim.grad_accum={ACCUM}", f"optim.max_steps={STEPS}",
        "runtime.save_every=100", f"runtime.precision={'bf16' if cuda else 'fp32'}", *extra])
    if kind == "deepspeed_zero1":
        from deepspeed.runtime.engine import DeepSpeedEngine

        owner, name = DeepSpeedEngine, "_take_model_step"
    else:
        owner, name = torch.optim.AdamW, "step"
    from accelerate import Accelerator

    with counting(owner, name) as calls, counting(Accelerator, "backward") as backwards:
        res = train(recipe)
    dtype = backwards[0].distributed_type.name if backwards else None
    return {"status": "ok", "engine_steps": res.steps, "optimizer_steps_counted": len(calls),
            "backward_passes": len(backwards), "distributed_type": dtype,
            "correct": len(calls) == STEPS and res.steps == STEPS and len(backwards) == STEPS * ACCUM
            and dtype in EXPECTED_TYPE[kind],
            "counted": f"{owner.__name__}.{name}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_isolated(kind: str, root: Path, timeout: float = ISOLATED_TIMEOUT_S) -> dict:
    """``run_engine`` in a fresh process, in a one-process distributed world (what torchrun sets)."""
    out = root / f"engine-{kind}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_USE_")}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", kind, "--root", str(root), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads(out.read_text())


def engines(cuda: bool, root: Path) -> dict:
    """Every back end this machine can run; the others say why they were skipped."""
    out = {}
    for kind in ("plain", "deepspeed_zero1", "fsdp2"):
        if kind != "plain" and not cuda:
            out[kind] = {"status": "skipped", "reason": "needs a GPU (accelerate runs neither DeepSpeed nor FSDP2 "
                                                        "on CPU)"}
            continue
        if kind == "deepspeed_zero1" and importlib.util.find_spec("deepspeed") is None:
            out[kind] = {"status": "skipped", "reason": "deepspeed is not installed (pip install 'viq[deepspeed]')"}
            continue
        if kind != "plain":  # its own process and process group
            out[kind] = run_isolated(kind, root)
            continue
        try:
            out[kind] = run_engine(kind, root, cuda)
        except Exception as exc:  # recorded; the other back ends still run
            out[kind] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=8)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU: the plain back end only")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--engine", choices=sorted(EXPECTED_TYPE), default=None,
                    help="internal: run this one back end on the world in --root (what the isolated runs call)")
    ap.add_argument("--root", default=None, help="internal: a folder make_world filled")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if args.engine:
        try:
            res = run_engine(args.engine, Path(args.root), cuda)
        except Exception as exc:
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
        return res
    with tempfile.TemporaryDirectory(prefix="viq-train-check-") as tmp:
        res = engines(cuda, make_world(Path(tmp)))
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
