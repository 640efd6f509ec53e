"""Options and helpers shared by several commands (model, device, distributed rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from viqctl.console import err

_MODEL_HELP = ("Weights: a viq directory, a reference converted_<size>/ directory, a name placed by "
               "`viqctl download` (e.g. viq-16k), a Hub repo REPO_ID[:SUBFOLDER] found in the Hugging Face "
               "cache (e.g. XuminYu/ViQ_weights:converted_16k), or demo (the bundled demo model). ")
ModelOpt = typer.Option(None, "--model", "-m", help=_MODEL_HELP + "Default: demo.", show_default=False)
StoreModelOpt = typer.Option(None, "--model", "-m", show_default=False,
                             help=_MODEL_HELP + "Default: the model recorded in the code store (demo for images).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... (auto: cuda when available).")
DtypeOpt = typer.Option("auto", "--dtype", help="float32 or bfloat16 (auto: float32 on CPU, bfloat16 on CUDA).")
ModelsDirOpt = typer.Option(None, "--models-dir", envvar="VIQ_MODELS_DIR",
                            help="Where `viqctl download` keeps models (default ~/.cache/viq/models).")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks for errors.")


def check_out_dir(path: Path, store: bool = False) -> None:
    """Before any work: ``--out`` must be a folder (or not exist yet). With ``store``, a non-empty folder
    must be a code store (to resume or add to), so a typo never scatters shards among other files."""
    from viq.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file, not a folder; give a new folder (or an existing code store)"
                          if store else f"--out {path}: is a file, not a folder")
    if store and path.is_dir() and not (path / "manifest.json").is_file():
        others = sorted(p.name for p in path.iterdir() if not p.name.startswith(".tmp-"))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(f"--out {path}: not empty ({shown}) and not a viq code store; give a new or empty "
                              "folder, or a code store to resume")
    for parent in path.parents:  # a file where a folder must be created
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
            break


def check_out_file(path: Path, suffix: str | None = None) -> None:
    """Before any work: ``--out`` names a file to write, not a folder."""
    from viq.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        example = f" such as {path / ('features' + (suffix or ''))}" if suffix else ""
        raise ConfigError(f"--out {path}: is a folder; give a file name{example}")
    check_out_dir(path.parent)


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


def _meta(model_dir) -> dict:
    try:
        meta = json.loads((Path(model_dir) / "config.json").read_text())
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


def choose_decoder(model_dir, decoder: Optional[str], quiet: bool = False) -> str:
    """``--decoder`` as given, or the one that works for this model: ``pixel`` when it has a pixel
    decoder and its drawer is missing or was trained against a random VAE (the demo model), else ``vae``.
    Says which when it chose."""
    if decoder is not None:
        if decoder not in ("vae", "pixel"):
            from viq.errors import ConfigError

            raise ConfigError(f"--decoder {decoder}: use vae or pixel")
        return decoder
    meta = _meta(model_dir)
    parts, source = meta.get("parts") or {}, meta.get("source") or {}
    if "pixel_decoder" in parts and ("drawer" not in parts or source.get("drawer_vae") == "random"):
        if not quiet:
            why = "its drawer was trained against a random VAE" if "drawer" in parts else "it has no drawer"
            err.print(f"decoder: pixel (this model's pixel decoder; {why}; --decoder vae to choose that path)",
                      highlight=False, markup=False)
        return "pixel"
    return "vae"


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
