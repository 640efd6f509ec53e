"""viqctl encode: images -> a code store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from viqctl.common import (DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, ModelsDirOpt, device_of,
                           close_distributed, distributed, models_dir_of, say_model, warn_if_random)
from viqctl.console import cli_errors, err, out, print_json


def encode(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive), glob patterns, or .txt/.jsonl lists of paths."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Code store directory (created; rerun the same command to resume)."),
    model: Optional[str] = ModelOpt,
    resize: str = typer.Option("native", "--resize",
                               help="native[:MAX_PIXELS] (keep aspect, shrink above 1024x1024 px, sides floored to "
                                    "multiples of 16), center-crop:T (the reference's), or none."),
    token_budget: int = typer.Option(16384, "--token-budget", help="Patch tokens per packed batch."),
    workers: int = typer.Option(4, "--workers", help="Threads decoding images ahead of the model."),
    rows_per_shard: int = typer.Option(256, "--rows-per-shard", help="Images per Parquet shard."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Encode images into ViQ codes (a Parquet code store with a manifest).

    Example: viqctl encode photos/ --model viq-16k --out codes/

    Exit 0 when every image was encoded, 1 when some failed (listed), 2 for usage errors.
    Under `accelerate launch` / `torchrun` every rank encodes its share into its own shards.
    """
    from viq.encode import EncodeOptions, encode_to_store
    from viq.sources import collect_sources
    from viq.tokenizer import load_tokenizer, resolve_source
    from viq.weights.formats import model_fingerprints

    with cli_errors(debug):
        rank, world, barrier, dist_device = distributed()
        sources = collect_sources(inputs)
        src_path = resolve_source(model, models_dir_of(models_dir))
        if rank == 0:
            warn_if_random(src_path, parts=())
        tok = load_tokenizer(src_path, parts=("encoder",), device=dist_device or device_of(device), dtype=dtype)
        say_model(tok, quiet=rank != 0)
        fps = model_fingerprints(src_path)
        opts = EncodeOptions(policy=resize, token_budget=token_budget, rows_per_shard=rows_per_shard, workers=workers)
        columns = [TextColumn("[bold]encode"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn()]
        with Progress(*columns, console=err, disable=rank != 0 or json_out) as bar:
            from viq.sources import shard_for_rank

            task = bar.add_task("encode", total=len(shard_for_rank(sources, rank, world)), rate="-")
            import time

            t0 = time.perf_counter()

            def advance(n):
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}")

            summary = encode_to_store(sources, tok, out_dir, fps, opts, rank, world, advance, barrier)
        if world > 1:  # every rank's counts, reported once by rank 0
            import torch.distributed as dist

            from viq.encode import merge_summaries

            parts = [None] * world
            dist.all_gather_object(parts, summary.as_dict())
            summary = merge_summaries(parts)
            close_distributed()
            if rank != 0:
                raise typer.Exit(1 if summary.failed else 0)
        if json_out:
            print_json(summary.as_dict())
        else:
            table = Table(title=f"encoded into {out_dir}")
            for col in ("images", "encoded", "skipped (done)", "failed", "img/s", "tokens"):
                table.add_column(col, justify="right")
            table.add_row(str(summary.total), str(summary.encoded), str(summary.skipped), str(summary.failed),
                          f"{summary.images_per_s:.2f}", str(summary.tokens))
            out.print(table)
            for f in summary.failures:
                out.print(f"[red]failed[/] {f['reason']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if summary.failed else 0)
