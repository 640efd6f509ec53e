"""``train(recipe)``: dispatch a resolved recipe to its stage and run it on the one engine.

    setup (``viq.train.setup``: accelerator, seeds, output folder)
      -> build (the stage: ``viq.train.stages.*``, assembled by ``viq.train.build``)
      -> run (``viq.train.engine.Engine``) -> the stage's export.

What a run writes under ``recipe.out_dir`` (``run.output_dir[/<stage>]``): ``recipe.yaml`` (the
resolved recipe), ``checkpoints/step-N/`` (atomic, for resume), ``model.safetensors`` (the trained
tensors: what the next stage loads), ``metrics.json``, and per stage ``training.json``,
``tokenizer.json`` (word tokenizer of tiny runs), ``viq/`` (inference weights), ``init-report.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from viq.errors import ConfigError
from viq.train.build import (InitReport, apply_init, build_mllm, build_student, build_target_vae,  # noqa: F401
                             detect_format, init_tensors)
from viq.train.progress import ProgressFn
from viq.train.setup import (deepspeed_plugin, frozen_tokenizer_dir, make_accelerator, make_tokenizer,  # noqa: F401
                             read_data, recipe_fingerprint, start_run)
from viq.train.weight_paths import resolve_recipe_weights

log = logging.getLogger("viq.train")


@dataclass
class TrainResult:
    out_dir: Path
    stage: Optional[str]
    steps: int
    metrics: dict
    metrics_path: Path
    state_path: Path  # model.safetensors (final trained tensors)
    viq_dir: Optional[Path]  # viq weights directory (FSQ tokenizer runs, decoder runs)
    checkpoint: Optional[Path]  # the last checkpoint written
    resumed_from: Optional[Path]
    init: Optional[InitReport]
    history: list[dict]  # per optimizer step: this process's loss terms, LR (the step's), counts
    skipped: list[str]  # "sample <index> (id ...): reason", data file and runtime skips
    resumed_step: Optional[int] = None  # the step the resumed checkpoint had done


def stage_class(task: str):
    if task == "tokenizer":
        from viq.train.stages.tokenizer import TokenizerStage

        return TokenizerStage
    if task == "decoder":
        from viq.train.stages.decoder import DecoderStage

        return DecoderStage
    if task == "mllm_offline":
        from viq.train.stages.offline import OfflineStage

        return OfflineStage
    raise ConfigError(f"run.task {task!r} is not implemented")


def train(recipe, *, progress: Optional[ProgressFn] = None, resume: Optional[bool] = None,
          eval_limit: Optional[int] = None, eval_at_start: bool = True) -> TrainResult:
    """Train as ``recipe`` says; returns metrics and where everything was written.

    ``resume`` (default: ``recipe.runtime.resume``) continues from the newest complete checkpoint in
    ``<out_dir>/checkpoints`` (a fresh start when there is none, said so). ``progress`` receives
    ``ProgressEvent``s (start, resume, eval_start, eval_progress, eval, step, log, save, end) on the
    main process; ``step`` events also on the others, with the sample indices that process read.
    ``eval_limit`` caps the held-out samples evaluated; ``eval_at_start`` also measures the untrained
    model (the "before" numbers). Weights fields may name a `viqctl download` entry
    (``teacher.ckpt: siglip2-g``): see ``weight_paths``.
    """
    from viq.train.engine import Engine

    recipe = resolve_recipe_weights(recipe)
    cls = stage_class(recipe.run.task)
    cls.check(recipe)
    acc, resume, out = start_run(recipe, resume)
    stage = cls(recipe, acc, out, resume, eval_limit)
    engine = Engine(acc, stage, recipe, out, progress, resume=resume, eval_at_start=eval_at_start,
                    fingerprint=recipe_fingerprint(recipe))
    result = engine.run()
    exported = stage.export(result)
    if acc.is_main_process:
        log.info("done: %d steps in %.1fs; outputs in %s", result.steps, result.elapsed_s, out)
    engine.emit("end", {"steps": result.steps, "evals": result.evals})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(out, recipe.run.stage, result.steps, exported.metrics, out / "metrics.json",
                       exported.state_path, exported.viq_dir, result.last_checkpoint, result.resumed_from,
                       getattr(stage, "init_report", None), result.history,
                       stage.skipped_in_file() + result.skipped, result.resumed_step)
