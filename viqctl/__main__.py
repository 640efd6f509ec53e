"""Entry point: assembles the Typer app from one module per command."""

from __future__ import annotations

import importlib
import sys

import typer

from viqctl import helpstyle

helpstyle.apply()  # --json, PATH, INPUTS...: the conventional help look on every Typer release

app = typer.Typer(
    name="viqctl",
    help="ViQ discrete visual tokenizer: encode images to codes, embed, reconstruct, convert, verify, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import viq

        typer.echo(f"viq {viq.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the viq version and exit.")):
    """ViQ discrete visual tokenizer.

    Typical use: `viqctl encode images/` (codes into ./codes), then `viqctl reconstruct codes --out recon/`.
    Training recipes ship with viq: `viqctl recipes` lists them, `viqctl train --recipe tiny.yaml` runs one.
    """


# (module in viqctl/, function name, command name). Each module holds one command.
COMMANDS = [
    ("encode", "encode", "encode"),
    ("decode", "reconstruct", "reconstruct"),
    ("decode", "embed", "embed"),
    ("tokens", "tokens", "tokens"),
    ("evaluate", "evaluate", "eval"),
    ("weights", "convert", "convert"),
    ("weights", "verify", "verify"),
    ("data", "shapes", "shapes"),
    ("train", "train", "train"),
    ("caption", "caption", "caption"),
    ("download", "download", "download"),
    ("bench", "bench", "bench"),
]

for module_name, func_name, command_name in COMMANDS:
    module = importlib.import_module(f"viqctl.{module_name}")
    app.command(command_name)(getattr(module, func_name))
app.add_typer(importlib.import_module("viqctl.recipes").app, name="recipes")


def gather_levels(argv: list[str]) -> list[str]:
    """``--levels 8 8 8 6 5`` -> ``--levels=8,8,8,6,5``: click options take one value each."""
    out, i = [], 0
    while i < len(argv):
        j = i + 1
        while argv[i] == "--levels" and j < len(argv) and argv[j].isdigit():
            j += 1
        if j - i > 2:
            out.append("--levels=" + ",".join(argv[i + 1:j]))
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def main() -> None:
    app(args=gather_levels(sys.argv[1:]))


if __name__ == "__main__":
    main()
