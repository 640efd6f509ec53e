"""viqctl reconstruct / viqctl embed: a code store back to pixels or LLM features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from viqctl.common import (DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelsDirOpt, StoreModelOpt, check_out_dir,
                           check_out_file, choose_decoder, device_of, models_dir_of, say_model, warn_if_random)
from viqctl.console import cli_errors, err, out, print_json

IdsOpt = typer.Option(None, "--ids", help="Comma-separated ids (as stored: the file names, e.g. a.jpg,b.png) "
                                           "to use (default: every image in the store).")


def _locate(store_dir: Path, model: Optional[str], models_dir):
    from viq.decode import store_model_source
    from viq.errors import HubError, StoreError, WeightsError
    from viq.store import CodeStore
    from viq.tokenizer import resolve_source

    store = CodeStore(store_dir)
    source = model or store_model_source(store)
    if source is None:
        raise StoreError(f"{store_dir}: the manifest names no model; pass --model")
    try:
        return store, resolve_source(source, models_dir_of(models_dir))
    except (WeightsError, HubError) as e:
        if model:
            raise
        raise type(e)(f"{e} (the model {store_dir} was encoded with, as its manifest records it); "
                      "pass that model with --model") from None


def _load(path, device, dtype, parts):
    from viq.tokenizer import load_tokenizer

    warn_if_random(path, parts)
    tok = load_tokenizer(path, parts=parts, device=device_of(device), dtype=dtype)
    say_model(tok)
    return tok


def _bar(label: str, total: int, quiet: bool):
    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    bar = Progress(*cols, console=err, disable=quiet)
    return bar, bar.add_task(label, total=total)


def reconstruct(
    store_dir: Path = typer.Argument(Path("codes"), help="A code store made by `viqctl encode` (the default is "
                                     "where it writes by default)."),
    out_dir: Path = typer.Option(Path("recon"), "--out", "-o", help="Folder for the PNGs (named after the ids); "
                                 "rerun the same command to resume."),
    ids: Optional[str] = IdsOpt,
    keep_padding: bool = typer.Option(False, "--keep-padding",
                                      help="Keep the patch padding (the reference's 16h x 16w output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rewrite PNGs that already exist."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="vae: drawer + Qwen-Image VAE (published); "
                                          "pixel: the lightweight pixel decoder trained by the decoder stage. "
                                          "Default: pixel for a model whose drawer learned a random VAE (the demo "
                                          "model), else vae; said on stderr.", show_default=False),
    model: Optional[str] = StoreModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Draw codes back into images (drawer + Qwen-Image VAE, or the pixel decoder: --decoder).

    Example: viqctl reconstruct codes/ --out recon/   (also what a bare `viqctl reconstruct` does)

    The model defaults to the one recorded in the store; a model with other FSQ levels or another
    decoder fingerprint is refused. The decoder defaults to the one that works for the model (the
    pixel decoder for the demo model, whose drawer learned a random VAE) and is named on stderr.
    Existing PNGs are skipped, so an interrupted run resumes.
    """
    with cli_errors(debug):
        check_out_dir(out_dir)  # usage problems first: before torch is even imported
        if not Path(store_dir).exists():
            from viq.errors import ConfigError

            raise ConfigError(f"no code store at {store_dir} ({Path(store_dir).resolve()}); make one with "
                              f"`viqctl encode IMAGES --out {store_dir}`, or give its path: viqctl reconstruct STORE_DIR")
        from viq.decode import reconstruct_store, select_ids

        store, path = _locate(store_dir, model, models_dir)
        err.print(f"images -> {Path(out_dir).resolve()} (from {store_dir}; rerun the same command to resume)",
                  highlight=False, markup=False)
        decoder = choose_decoder(path, decoder)
        parts = ("decoder", "pixel_decoder") if decoder == "pixel" else ("decoder", "drawer")
        tok = _load(path, device, dtype, parts)
        chosen = [i for i in ids.split(",") if i] if ids else None
        bar, task = _bar("reconstruct", len(select_ids(store, chosen)), json_out)
        with bar:
            summary = reconstruct_store(store, tok, out_dir, chosen, crop=not keep_padding, overwrite=overwrite,
                                        progress=lambda n: bar.advance(task, n), decoder=decoder)
        if json_out:
            print_json({**summary.__dict__, "decoder": decoder})
        else:
            out.print(f"wrote {len(summary.written)} PNG(s) to {out_dir} ({decoder} decoder)"
                      + (f", {summary.skipped} already there" if summary.skipped else ""), highlight=False)
        for f in summary.failed:  # named; the other images were written
            err.print(f"failed {f['id']!r}: {f['reason']}", style="red", highlight=False, markup=False,
                      soft_wrap=True)
        if summary.failed:
            raise typer.Exit(1)


def embed(
    store_dir: Path = typer.Argument(..., help="A code store made by `viqctl encode`."),
    out_file: Path = typer.Option(..., "--out", "-o", help="A folder of feature shards, or one FILE.safetensors "
                                  "(one (h*w, C) entry per id); rerun the same command to resume."),
    ids: Optional[str] = IdsOpt,
    model: Optional[str] = StoreModelOpt,
    feature_dtype: str = typer.Option("float32", "--feature-dtype", help="float32 or bfloat16 (half the bytes)."),
    shard_mb: int = typer.Option(512, "--shard-mb", help="Features per shard (MiB): bounds memory."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Turn codes into LLM-ready features (the input of the MLLM projector).

    Example: viqctl embed codes/ --out feats.safetensors

    Streams: memory holds one shard; a folder --out gets features-NNNNNN.safetensors + index.json.
    """
    with cli_errors(debug):
        if Path(out_file).suffix == ".safetensors":  # usage problems first: before torch is even imported
            check_out_file(out_file, ".safetensors")
        else:  # a folder of shards: not an existing file
            check_out_dir(out_file)
        from viq.decode import select_ids
        from viq.embed import embed_store

        store, path = _locate(store_dir, model, models_dir)
        tok = _load(path, device, dtype, ("decoder",))
        chosen = [i for i in ids.split(",") if i] if ids else None
        bar, task = _bar("embed", len(select_ids(store, chosen)), json_out)
        with bar:
            result = embed_store(store, tok, out_file, chosen, progress=lambda n: bar.advance(task, n),
                                 dtype=feature_dtype, max_shard_bytes=max(1, shard_mb) << 20)
        if json_out:
            print_json(result)
        else:
            out.print(f"wrote features of {result['images']} image(s) ({result['dim']}-d) to {out_file}",
                      highlight=False)
