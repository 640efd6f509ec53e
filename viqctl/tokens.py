"""viqctl tokens: a code store -> token sequences for an autoregressive LLM (Parquet shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, err, out, print_json


def tokens(
    store_dir: Path = typer.Argument(..., help="A code store made by `viqctl encode`."),
    offset: Optional[int] = typer.Option(None, "--offset", help="First LLM token id of the ViQ block: the LLM "
                                         "tokenizer's length before the <viq_*> tokens are added."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Instead of --offset: a transformers "
                                            "tokenizer (folder or Hub id in the HF cache) the tokens are added to."),
    save_tokenizer: Optional[Path] = typer.Option(None, "--save-tokenizer", help="With --tokenizer: save the "
                                                  "tokenizer with the <viq_*> tokens added here."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for tokens-NNNNNN.parquet shards and tokens.json "
                                 "(rerun the same command to resume)."),
    rows_per_shard: int = typer.Option(1024, "--rows-per-shard", help="Images per Parquet shard."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Write every image's codes as one LLM token sequence (codes shifted by --offset).

    Example: viqctl tokens codes/ --offset 151665 --out tokens/
    Example: viqctl tokens codes/ --tokenizer Qwen/Qwen2.5-0.5B --save-tokenizer llm-tok/ --out tokens/

    Per image: BOI, each patch row's codes (4 per patch) then EOL, and EOI at the end.

    Ids: code c -> offset + c; BOI, EOI, EOL = offset + K, + K + 1, + K + 2 (K: codebook size).

    tokens.json records them; viq.tokens.tokens_to_codes inverts exactly. Rerun to resume.
    """
    from viq.store import CodeStore
    from viq.errors import ConfigError
    from viq.tokens import TokenLayout, tokenizer_layout, write_token_shards

    with cli_errors(debug):
        if (offset is None) == (tokenizer is None):
            raise ConfigError("give exactly one of --offset N or --tokenizer NAME_OR_PATH")
        if save_tokenizer is not None and tokenizer is None:
            raise ConfigError("--save-tokenizer needs --tokenizer")
        store = CodeStore(store_dir)
        size = int((store.manifest.get("model") or {}).get("codebook_size") or 0)
        layout = (TokenLayout(offset, size, 4) if tokenizer is None
                  else tokenizer_layout(tokenizer, size, save_tokenizer))
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
