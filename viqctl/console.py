"""Shared console helpers: results on stdout, progress and logs on stderr, errors as one red line."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import typer
from rich.console import Console

out = Console()  # results
err = Console(stderr=True)  # progress, logs, errors


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def cli_errors(debug: bool = False):
    """Turn viq's typed errors into one red line and their exit code."""
    from viq.errors import ViQError

    try:
        yield
    except ViQError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code)
