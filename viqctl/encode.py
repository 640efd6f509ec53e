"""viqctl encode: images -> a code store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from viqctl.common import (DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, ModelsDirOpt, check_out_dir,
                           device_of, close_distributed, distributed, models_dir_of, say_model, warn_if_random)
from viqctl.console import cli_errors, err, note, out, print_json, progress_lines


def encode(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive), glob patterns, .txt/.jsonl lists of paths, WebDataset .tar shards (shard-{000000..000009}.tar), Parquet files or datasets folders, LLaVA .json/.jsonl files. URLs are not fetched.",
                                       show_default=False),
    out_dir: Path = typer.Option(Path("codes"), "--out", "-o", help="Code store folder: created, or an existing "
                                 "store to resume (rerun the same command after a stop)."),
    model: Optional[str] = ModelOpt,
    resize: str = typer.Option("native", "--resize",
                               help="native[:MAX_PIXELS] (keep aspect, shrink above 1024x1024 px, sides floored to "
                                    "multiples of 16), center-crop:T (the reference's), or none."),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", help="Patch tokens per packed batch "
                                               "(default: 1024 on CPU, which bounds memory at full speed; sized "
                                               "for the free GPU memory on CUDA)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads decoding images ahead of the model "
                                          "(default: 0 on CPU, where decoding between batches is faster; 4 on GPU)."),
    rows_per_shard: int = typer.Option(256, "--rows-per-shard", help="Images per Parquet shard."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Parquet/datasets inputs: the image column (default: found)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet/datasets inputs: the column of ids (default: <file>/<row>)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="LLaVA .json/.jsonl inputs: the folder their image paths are relative to (default: the file's folder)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: encode job I's share of N (job arrays, I from 0); the N jobs cover every input once, into one store or several."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Encode images into ViQ codes (a Parquet code store with a manifest).

    Example: viqctl encode photos/ --model viq-16k --out codes/

    Without --out the codes go to ./codes (said on stderr, and "store" in --json).

    Exit 0 when every image was encoded, 1 when some failed (listed), 2 for usage errors.
    Under `accelerate launch` / `torchrun` every rank encodes its share into its own shards.
    """
    from viq.images import Native, parse_policy
    from viq.sources import InputOptions, collect_sources, parse_shard

    with cli_errors(debug):
        policy = parse_policy(resize)  # usage problems first: before torch is even imported
        check_out_dir(out_dir, store=True)
        if token_budget is not None and token_budget < 1 or workers is not None and workers < 0 or rows_per_shard < 1:
            from viq.errors import ConfigError

            raise ConfigError("--token-budget and --rows-per-shard must be >= 1, --workers >= 0")
        rank, world, barrier, dist_device = distributed()
        job, jobs = parse_shard(shard) if shard else (0, 1)  # job I of N = global rank I * world + rank
        sources = collect_sources(inputs, options=InputOptions(image_column, id_column, image_root))
        from viq.encode import EncodeOptions, encode_to_store
        from viq.tokenizer import load_tokenizer, resolve_source
        from viq.weights.formats import model_fingerprints

        src_path = resolve_source(model, models_dir_of(models_dir))
        if rank == 0:
            err.print(f"codes -> {Path(out_dir).resolve()} ({len(sources)} image(s); rerun the same command to resume)",
                      highlight=False, markup=False)
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

            task = bar.add_task("encode", total=len(shard_for_rank(sources, job * world + rank, jobs * world)), rate="-")
            import time

            t0 = time.perf_counter()
            said = [t0] if rank == 0 and not json_out and progress_lines() else None  # a log: a line every 10 s

            def advance(n):
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}")
                if said is not None and time.perf_counter() - said[0] >= 10:
                    said[0] = time.perf_counter()
                    err.print(f"encode: {done:.0f}/{bar.tasks[0].total:.0f} ({bar.tasks[0].fields['rate']} img/s)",
                              highlight=False, markup=False)

            try:
                summary = encode_to_store(sources, tok, out_dir, fps, opts, job * world + rank, jobs * world, advance, barrier,
                                          finalize=jobs == 1)
            except KeyboardInterrupt:
                bar.stop()
                done = int(bar.tasks[0].completed)
                note(f"stopped after {done} of {len(sources)} image(s): every finished code row is kept in "
                     f"{out_dir}; run the same command again to resume (done images are skipped)", "interrupted")
                raise typer.Exit(130)
        resized = getattr(summary, "resized", 0)
        if resized and isinstance(policy, Native) and rank == 0:
            note(f"{resized} image(s) above {policy.max_pixels} pixels were downscaled by --resize native "
                 f"(aspect kept); --resize native:N sets another budget, --resize none keeps every pixel")
        if world > 1:  # every rank's counts, reported once by rank 0
            import torch.distributed as dist

            from viq.encode import merge_summaries

            parts = [None] * world
            dist.all_gather_object(parts, summary.as_dict())
            summary = merge_summaries(parts)
            close_distributed()
            if rank != 0:
                raise typer.Exit(1 if summary.failed else 0)
        redone = getattr(summary, "redone", [])
        if redone:  # rows the store found damaged on open, encoded again from their inputs by this run
            note(f"{len(redone)} damaged store row(s) encoded again from their inputs", "redone")
            for rec in redone[:20]:
                why = rec["reason"].removesuffix("; encode it again")
                err.print(f"redone {rec['id']}: {why}", highlight=False, markup=False, soft_wrap=True)
            if len(redone) > 20:
                err.print(f"... and {len(redone) - 20} more (all in --json: \"redone\")", highlight=False,
                          markup=False)
        if jobs > 1:  # no job may finalize while others write; a CodeStore reads the store as it is
            err.print(f"job {job} of {jobs} done (store not finalized; after the last job, rerun without --shard to "
                      "finalize, or read it as is)", highlight=False, markup=False)
        if json_out:
            print_json({**summary.as_dict(), "store": str(Path(out_dir).resolve())})
        else:
            table = Table(title=f"encoded into {out_dir}")
            cols = ("images", "encoded", "skipped (done)", "failed", "img/s", "tokens") + (
                ("redone",) if redone else ())
            for col in cols:
                table.add_column(col, justify="right")
            table.add_row(str(summary.total), str(summary.encoded), str(summary.skipped), str(summary.failed),
                          f"{summary.images_per_s:.2f}", str(summary.tokens), *[str(len(redone))] * bool(redone))
            out.print(table)
            for f in summary.failures:
                out.print(f"[red]failed[/] {f['reason']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if summary.failed else 0)
