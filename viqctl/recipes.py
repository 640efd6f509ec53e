"""viqctl recipes: the training recipes shipped with viq (list them, copy one to edit)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, err, out, print_json

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context, json_out: bool = JsonOpt, debug: bool = DebugOpt):
    """List the training recipes shipped with viq, one line each (name, stages, what it trains).

    Example: viqctl recipes

    Run one by name from any directory: viqctl train --recipe fsq16k.yaml --print-config
    Copy one to edit (its base recipe comes along): viqctl recipes cp fsq16k.yaml my-fsq16k.yaml
    """
    if ctx.invoked_subcommand is not None:
        return
    from viq.train.recipe.catalog import list_recipes, shipped_dir

    with cli_errors(debug):
        entries = list_recipes()
        if json_out:
            print_json({"folder": str(shipped_dir()), "recipes": [e.as_dict() for e in entries]})
            return
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            stages = f"stages {','.join(e.stages)}" if e.stages else "one stage"
            base = f" (extends {e.extends})" if e.extends else ""
            out.print(f"{e.name:<{width}}  {stages:<17} {e.summary}{base}", markup=False, highlight=False)
        err.print(f"{len(entries)} recipes in {shipped_dir()}; run one with `viqctl train --recipe NAME`, "
                  "copy one to edit with `viqctl recipes cp NAME [DEST]`", highlight=False, markup=False)


@app.command("cp")
def cp(
    name: str = typer.Argument(..., help="A shipped recipe, e.g. fsq16k.yaml (see `viqctl recipes`).",
                               show_default=False),
    dest: Optional[Path] = typer.Argument(None, help="A folder or a new .yaml file name (default: the current "
                                                     "folder).", show_default=False),
    force: bool = typer.Option(False, "--force", help="Overwrite files that exist."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Copy a shipped recipe to edit; a recipe that extends another brings its base along.

    Example: viqctl recipes cp fsq16k.yaml my-fsq16k.yaml && viqctl train --recipe my-fsq16k.yaml
    """
    from viq.train.recipe.catalog import copy_recipe

    with cli_errors(debug):
        written = copy_recipe(name, dest, overwrite=force)
        if json_out:
            print_json({"written": [str(p) for p in written]})
            return
        extra = f" (with its base {', '.join(p.name for p in written[1:])})" if len(written) > 1 else ""
        out.print(f"copied {name} to {written[0]}{extra}; edit it, then "
                  f"`viqctl train --recipe {written[0]}`", markup=False, highlight=False)
