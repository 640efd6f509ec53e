"""viqctl train: typed YAML recipes, stages, dotted overrides; the loop runs on accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, err, out, print_json


def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=3e-4 "
                                                              "model.head.levels=[8,8,8,6,5]."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A YAML recipe: a path, or a shipped recipe's name "
                                 "such as fsq16k.yaml (`viqctl recipes` lists them)."),
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
    Checkpoints are written atomically every runtime.save_every steps; --resume continues exactly
    (Ctrl-C keeps the last checkpoint). --json prints the run's summary as JSON on stdout.
    """
    from viq.train import load_recipe
    from viq.train.recipe.catalog import find_recipe

    with cli_errors(debug):
        rec = load_recipe(find_recipe(recipe), stage=stage, overrides=overrides or [])  # a path, or a shipped name
        if print_config:
            out.print(rec.to_yaml(), highlight=False, markup=False, soft_wrap=True)
            return
        from viq.train.engine import TrainingInterrupted
        from viq.train.progress import format_metrics
        from viq.train.run import train as run_train

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        with Progress(*columns, console=err, disable=json_out) as bar:
            task = evaluating = None

            def progress(ev):
                nonlocal task, evaluating
                if not ev.main:
                    return
                if task is None:
                    task = bar.add_task(f"train {stage or ''}".strip(), total=ev.total or None, info="")
                m = ev.metrics
                if ev.kind == "step":
                    info = " ".join(f"{k}={m[k]:.4g}" for k in ("loss", "lr") if isinstance(m.get(k), (int, float)))
                    bar.update(task, completed=ev.step, info=info)
                elif ev.kind == "resume" and not json_out:
                    err.print(ev.message, highlight=False)
                    bar.update(task, completed=ev.step)
                elif ev.kind == "eval_start" and not json_out:
                    evaluating = bar.add_task(f"eval ({m.get('label')})", total=m.get("samples") or None,
                                              info="held-out samples")
                elif ev.kind == "eval_progress" and evaluating is not None:
                    bar.update(evaluating, completed=m.get("done", 0))
                elif ev.kind == "log" and not json_out:  # the window's means, codebook usage, tokens/s
                    shown = {k: v for k, v in m.items() if k != "step"}
                    err.print(f"[dim]step {ev.step}/{ev.total}[/] {format_metrics(shown)}", highlight=False)
                elif ev.kind == "eval" and not json_out:
                    if evaluating is not None:
                        bar.remove_task(evaluating)
                        evaluating = None
                    label = m.get("label", f"step {ev.step}")
                    err.print(f"[bold]eval ({label})[/] {format_metrics(m)}", highlight=False)
                elif ev.kind == "save" and not json_out:
                    err.print(f"[dim]checkpoint {m.get('checkpoint', '')}[/]", highlight=False)

            try:
                result = run_train(rec, progress=progress, resume=resume)
            except TrainingInterrupted as stop:
                bar.stop()
                err.print(f"[bold yellow]stopped:[/] {stop.message}", highlight=False)
                raise typer.Exit(130)
        summary = {"out_dir": str(result.out_dir), "stage": result.stage, "steps": result.steps,
                   "metrics": result.metrics, "metrics_file": str(result.metrics_path),
                   "weights": str(result.viq_dir) if result.viq_dir else None,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                   "resumed_step": result.resumed_step, "skipped": result.skipped[:50]}
        if json_out:
            print_json(summary)
            return
        final = result.metrics.get("eval") or {}
        final = final.get("final", final) if isinstance(final, dict) else {}
        if final:
            out.print(f"final eval: {format_metrics(final)}", highlight=False)
        if result.skipped:
            out.print(f"{len(result.skipped)} sample(s) skipped; listed in {result.metrics_path}", highlight=False)
        out.print(f"trained {result.steps} steps -> {result.out_dir}"
                  + (f" (resumed from step {result.resumed_step})" if result.resumed_step is not None else "")
                  + (f"; inference weights in {result.viq_dir}" if result.viq_dir else "")
                  + f"; metrics in {result.metrics_path}", highlight=False)
