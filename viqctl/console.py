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
def progress_bar(label: str, total: int | None, quiet: bool = False, every_s: float = 10.0):
    """Yield ``advance(n=1)`` for a long step: a live bar on a terminal; on a pipe or a log file,
    a plain ``label: done/total (elapsed)`` line at most every ``every_s`` seconds, and at the end."""
    import time

    if quiet:
        yield lambda n=1: None
        return
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    start = last = time.perf_counter()
    done = [0]

    def line():
        of = f"/{total}" if total is not None else ""
        err.print(f"{label}: {done[0]}{of} ({time.perf_counter() - start:.0f} s)", highlight=False, markup=False)

    def advance(n=1):
        nonlocal last
        done[0] += n
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            line()

    yield advance
    line()


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
    except KeyboardInterrupt:
        if debug:
            raise
        error("stopped by Ctrl-C (what was already written is kept; rerun the command to finish)", "interrupted")
        raise typer.Exit(130)
