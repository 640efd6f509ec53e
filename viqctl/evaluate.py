"""viqctl eval: reconstruction quality and code statistics."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from viqctl.common import (DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelsDirOpt, StoreModelOpt, choose_decoder,
                           device_of, models_dir_of, say_model, warn_if_random)
from viqctl.console import cli_errors, err, out, print_json, progress_bar


def evaluate(
    inputs: List[str] = typer.Argument(..., help="A code store, or images as encode reads them: files, folders, "
                                       "globs, .txt/.jsonl lists, WebDataset .tar shards, Parquet files or datasets "
                                       "folders, LLaVA .json/.jsonl files.", show_default=False),
    model: Optional[str] = StoreModelOpt,
    decoder: Optional[str] = typer.Option(None, "--decoder", help="vae (published drawer + Qwen-Image VAE) or "
                                          "pixel. Default: as `viqctl reconstruct` (pixel for the demo model).",
                                          show_default=False),
    resize: str = typer.Option("native", "--resize", help="Preprocessing for images (a store keeps its own)."),
    lpips: Optional[Path] = typer.Option(None, "--lpips", help="LPIPS weights, file or folder (torchvision's "
                                                                "vgg16-397923af.pth + the lpips package's v0.1 "
                                                                "vgg.pth). Without it LPIPS is skipped."),
    fid: Optional[Path] = typer.Option(None, "--fid", help="FID Inception weights (pt_inception). Without it rFID is skipped."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Write a side-by-side PNG (original | reconstruction)."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Parquet/datasets inputs: the image "
                                               "column (default: found)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet/datasets inputs: the column of ids "
                                            "(default: <file>/<row>)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="LLaVA .json/.jsonl inputs: the folder "
                                              "their image paths are relative to (default: the file's folder)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """PSNR, SSIM, LPIPS, rFID, codebook usage and bits per pixel of a tokenizer's reconstructions.

    Example: viqctl eval viq/assets/examples --model viq-16k --grid grid.png

    Inputs are read as encode reads them: `viqctl eval shard-000000.tar`, `viqctl eval data.parquet
    --image-column image`, `viqctl eval llava.json --image-root images/`.

    rFID protocol: Inception-v3 pool features (2048-d) of originals vs reconstructions, each image
    resized to 299x299 bilinear, Frechet distance over the evaluated set (needs >= 2 images; small
    sets give biased values, compare only like with like). PSNR/SSIM on uint8 RGB at the size the
    tokenizer saw (padding cropped away); SSIM per channel with an 11x11 Gaussian window.
    """
    from viq.eval.pipeline import evaluate_sources, evaluate_store
    from viq.tokenizer import load_tokenizer, resolve_source

    with cli_errors(debug):
        from viq.images import parse_policy

        parse_policy(resize)  # usage problems first: before any weights load
        first = Path(inputs[0])
        store = None
        if len(inputs) == 1 and (first / "manifest.json").is_file():
            from viq.store import CodeStore

            store = CodeStore(first)
            src = resolve_source(model or store.manifest["model"]["source"], models_dir_of(models_dir))
        else:
            from viq.sources import InputOptions, collect_sources

            # Sources, not paths: tar members, Parquet rows and LLaVA images are read as encode reads them
            sources = collect_sources(inputs, options=InputOptions(image_column, id_column, image_root))
            src = resolve_source(model, models_dir_of(models_dir))
        decoder = choose_decoder(src, decoder)
        parts = ("encoder", "decoder", "pixel_decoder") if decoder == "pixel" else ("encoder", "decoder", "drawer")
        perceptual = fid_net = None
        if lpips is not None:
            from viq.eval.perceptual import load_lpips

            perceptual = load_lpips(lpips)
        if fid is not None:
            from viq.eval.fid import load_fid_net

            fid_net = load_fid_net(fid)
        warn_if_random(src, parts)
        tok = load_tokenizer(src, parts=parts[1:] if store is not None else parts, device=device_of(device),
                             dtype=dtype)
        say_model(tok)
        if store is not None:
            from viq.decode import select_ids

            with progress_bar("eval", len(select_ids(store, None)), quiet=json_out) as advance:
                result = evaluate_store(tok, store, decoder, perceptual, fid_net, grid, progress=advance)
        else:
            with progress_bar("eval", len(sources), quiet=json_out) as advance:
                result = evaluate_sources(tok, sources, resize, decoder, perceptual, fid_net, grid, progress=advance)
        if perceptual is None and not json_out:
            err.print("LPIPS skipped (no --lpips weights); rFID skipped (no --fid weights)" if fid_net is None
                      else "LPIPS skipped (no --lpips weights)", highlight=False)
        if json_out:
            print_json(result)
        else:
            table = Table(title=f"{result['model']} ({decoder} decoder, {result['images']} images)")
            for col in ("PSNR", "SSIM", "LPIPS", "rFID", "codes used", "perplexity", "bits/pixel"):
                table.add_column(col, justify="right")
            if result["images"]:
                cb, bpp = result["codebook"], result["bits_per_pixel"]
                fmt = lambda v, f: "-" if v is None else format(v, f)
                table.add_row(fmt(result["psnr"], ".2f"), fmt(result["ssim"], ".4f"), fmt(result["lpips"], ".4f"),
                              fmt(result["rfid"], ".2f"), fmt(cb.get("usage"), ".4f"), fmt(cb.get("perplexity"), ".1f"),
                              fmt(bpp.get("bpp_original", bpp.get("bpp_padded")), ".4f"))
            out.print(table)
            for f in result["failures"]:
                out.print(f"[red]failed[/] {f['reason']}", highlight=False, soft_wrap=True)
            if result.get("grid"):
                out.print(f"grid: {result['grid']}", highlight=False)
        raise typer.Exit(1 if result["failures"] else 0)
