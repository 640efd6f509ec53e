"""Options and helpers shared by several commands (model, device, distributed rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from viqctl.console import err

ModelOpt = typer.Option(None, "--model", "-m",
                        help="Weights: a viq directory, a reference converted_<size>/ directory, or a name "
                             "placed by `viqctl download` (e.g. viq-16k). Default: the bundled demo model.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... (auto: cuda when available).")
DtypeOpt = typer.Option("auto", "--dtype", help="float32 or bfloat16 (auto: float32 on CPU, bfloat16 on CUDA).")
ModelsDirOpt = typer.Option(None, "--models-dir", envvar="VIQ_MODELS_DIR",
                            help="Where `viqctl download` keeps models (default ~/.cache/viq/models).")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks for errors.")


def device_of(device: str) -> str | None:
    return None if device == "auto" else device


def warn_if_random(model_dir, parts=("drawer",)) -> None:
    """Say plainly when weights are a random initialisation."""
    try:
        meta = json.loads((Path(model_dir) / "config.json").read_text())
    except Exception:
        return
    from viq.demo import is_random

    source = meta.get("source") or {}
    if is_random(source):
        err.print("[bold yellow]warning:[/] this model has RANDOM weights (not trained): its codes and "
                  "reconstructions carry no meaning. Pass --model with trained weights.", highlight=False)
    elif source.get("drawer_vae") == "random" and "drawer" in parts and "drawer" in (meta.get("parts") or {}):
        err.print("[bold yellow]note:[/] this model's drawer was trained against a RANDOM VAE (no Qwen-Image "
                  "weights were available), so VAE-path reconstructions do not resemble the input; its codes "
                  "and features are trained.", highlight=False)


def say_model(tok, quiet: bool = False) -> None:
    """One line naming the model a command runs (which file layout, which architecture)."""
    if quiet or tok.report is None:
        return
    from viq.tokenizer import DEMO_MODEL

    r = tok.report
    if Path(tok.source).resolve() == DEMO_MODEL.resolve():
        what = "the bundled demo model (tiny, trained on synthetic shapes; pass --model for real weights)"
    else:
        what = f"{tok.source}"
    err.print(f"model: {what} [{r.layout} layout, {r.recognised}]", highlight=False, soft_wrap=True)


def distributed():
    """(rank, world_size, barrier, device) under accelerate launch / torchrun; (0, 1, None, None) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, None
    from accelerate import PartialState

    import torch

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, str(state.device)


def close_distributed():
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort a rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def models_dir_of(path: Optional[Path]):
    return Path(path).expanduser() if path else None
