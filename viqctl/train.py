"""viqctl train: typed YAML recipes, stages, dotted overrides; the loop runs on accelerate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, err, out, print_json


def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=3e-4 "
                                                              "head.quantizer.levels=[8,8,8,6,5]."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A YAML recipe (see recipes/)."),
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="A stage of the recipe (e.g. 1, 2-1, 2-2)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="Continue from the newest checkpoint of this run (default: the "
                                               "recipe's runtime.resume)."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Train the ViQ tokenizer from a recipe (single process, or many with `accelerate launch`).

    Example: viqctl train --recipe recipes/tiny.yaml --stage 2-1 optim.max_steps=50

    Many GPUs or machines: accelerate launch -m viqctl train --recipe recipes/fsq16k.yaml
    Checkpoints are written atomically every runtime.save_every steps; --resume continues exactly.
    """
    from viq.train import load_recipe
    from viq.train.recipe.catalog import find_recipe

    with cli_errors(debug):
        rec = load_recipe(find_recipe(recipe), stage=stage, overrides=overrides or [])  # a path, or a shipped name
        if print_config:
            out.print(rec.to_yaml(), highlight=False, markup=False, soft_wrap=True)
            return
        from viq.train.progress import format_metrics
        from viq.train.run import train as run_train

        columns = [TextColumn("[bold]train {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        with Progress(*columns, console=err, disable=json_out) as bar:
            task = None

            def progress(ev):
                nonlocal task
                if not ev.main:
                    return
                if task is None:
                    task = bar.add_task("train", total=ev.total or None, stage=stage or "", info="")
                m = ev.metrics
                if ev.kind == "step":
                    info = " ".join(f"{k}={m[k]:.4g}" for k in ("loss", "lr") if isinstance(m.get(k), (int, float)))
                    bar.update(task, completed=ev.step, info=info)
                elif ev.kind == "log" and not json_out:  # the window's means, codebook usage, tokens/s
                    shown = {k: v for k, v in m.items() if k != "step"}
                    err.print(f"[dim]step {ev.step}/{ev.total}[/] {format_metrics(shown)}", highlight=False)
                elif ev.kind == "eval" and not json_out:
                    label = m.get("label", f"step {ev.step}")
                    err.print(f"[bold]eval ({label})[/] {format_metrics(m)}", highlight=False)
                elif ev.kind == "save" and not json_out:
                    err.print(f"[dim]checkpoint {m.get('checkpoint', '')}[/]", highlight=False)

            result = run_train(rec, progress=progress, resume=resume)
        summary = {"out_dir": str(result.out_dir), "stage": result.stage, "steps": result.steps,
                   "metrics": result.metrics, "metrics_file": str(result.metrics_path),
                   "weights": str(result.viq_dir) if result.viq_dir else None,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                   "skipped": result.skipped[:50]}
        if json_out:
            print_json(summary)
        else:
            out.print(json.dumps(summary["metrics"], indent=2, default=str), highlight=False)
            out.print(f"trained {result.steps} steps -> {result.out_dir}"
                      + (f"; inference weights in {result.viq_dir}" if result.viq_dir else ""), highlight=False)
