"""viqctl tokens: a code store -> token sequences for an autoregressive LLM (Parquet shards)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, err, out, print_json


def tokens(
    store_dir: Path = typer.Argument(..., help="A code store made by `viqctl encode`."),
    offset: int = typer.Option(..., "--offset", help="First LLM token id of the ViQ block: the LLM tokenizer's "
                               "length before the <viq_*> tokens are added (viq.tokens.add_to_tokenizer)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for tokens-NNNNNN.parquet shards and tokens.json "
                                 "(rerun the same command to resume)."),
    rows_per_shard: int = typer.Option(1024, "--rows-per-shard", help="Images per Parquet shard."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Write every image's codes as one LLM token sequence (codes shifted by --offset).

    Example: viqctl tokens codes/ --offset 151665 --out tokens/

    Per image: BOI, then each patch row's codes (4 per patch) followed by EOL, then EOI, with
    code c -> offset + c, BOI = offset + K, EOI = offset + K + 1, EOL = offset + K + 2 (K = the
    codebook size). tokens.json records these ids; viq.tokens.tokens_to_codes inverts exactly.
    """
    from viq.store import CodeStore
    from viq.tokens import TokenLayout, write_token_shards

    with cli_errors(debug):
        store = CodeStore(store_dir)
        model = store.manifest.get("model") or {}
        layout = TokenLayout(offset, int(model.get("codebook_size") or 0), 4)
        cols = [TextColumn("[bold]tokens"), BarColumn(), MofNCompleteColumn()]
        with Progress(*cols, console=err, disable=json_out) as bar:
            task = bar.add_task("tokens", total=len(store))
            result = write_token_shards(store, out_dir, layout, rows_per_shard, progress=lambda n: bar.advance(task, n))
        if json_out:
            print_json(result)
        else:
            out.print(f"wrote token sequences of {result['images']} image(s) to {out_dir} "
                      f"(ids {layout.offset}..{layout.vocab_end - 1}: codes, then BOI {layout.boi}, EOI {layout.eoi}, "
                      f"EOL {layout.eol}; {result['shards_kept']} shard(s) already there)", highlight=False)
