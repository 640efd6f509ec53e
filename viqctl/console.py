"""Shared console helpers: results on stdout, progress and logs on stderr, errors as one red line.

Both consoles soft-wrap: a line is never broken by rich, whatever the width (rich assumes 80
columns when the stream is a pipe or a file). A path or a suggested command in a message stays one
unbroken string, so logs can be searched and commands copied; the terminal wraps for display.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

out = Console(soft_wrap=True)  # results
err = Console(stderr=True, soft_wrap=True)  # progress, logs, errors


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def error(message: str, label: str = "error") -> None:
    """``error: <message>`` on stderr, unwrapped; the message is shown literally (no rich markup)."""
    err.print(f"[bold red]{label}:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def note(message: str, label: str = "note") -> None:
    """``note: <message>`` on stderr, unwrapped, for things a user should know but that are not errors."""
    err.print(f"[bold yellow]{label}:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def progress_lines() -> bool:
    """True when stderr is not a terminal: progress is then written as plain lines, not redrawn bars."""
    return not err.is_terminal


@contextmanager
def cli_errors(debug: bool = False):
    """Turn viq's typed errors into one red line and their exit code."""
    from viq.errors import ViQError

    try:
        yield
    except ViQError as exc:
        if debug:
            raise
        error(str(exc))
        raise typer.Exit(exc.exit_code)
