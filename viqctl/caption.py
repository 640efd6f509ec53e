"""viqctl caption: what a trained offline MLLM says about the images of a code store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, out, print_json


def caption(
    store: Path = typer.Argument(..., help="A code store made by `viqctl encode`."),
    mllm: Path = typer.Option(..., "--mllm", help="A finished offline MLLM run folder (run.task mllm_offline)."),
    prompt: str = typer.Option("Describe the image.", "--prompt", help="The question asked about each image."),
    ids: Optional[List[str]] = typer.Option(None, "--id", help="Only these image ids (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many images."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Generate text for stored codes with a trained offline MLLM (greedy), one line per image.

    Example: viqctl caption data/shapes/codes --mllm runs/mllm-offline-tiny/tiny --limit 5
    """
    from viq.mllm.caption import caption_store, load_offline_run

    with cli_errors(debug):
        run = load_offline_run(mllm, device=device)
        rows = []
        for key, text in caption_store(store, run, prompt, ids=ids, limit=limit, max_new_tokens=max_new_tokens):
            rows.append({"id": key, "text": text})
            if not json_out:
                out.print(f"{key}\t{text}", highlight=False, markup=False)
        if json_out:
            print_json({"store": str(store), "mllm": str(mllm), "prompt": prompt, "captions": rows})
