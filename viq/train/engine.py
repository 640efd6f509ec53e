"""The one training loop: every stage (tokenizer, decoder, offline MLLM) runs on ``Engine``.

A stage (``viq.train.stage.Stage``) supplies its model, its micro-batches and its loss; the engine
owns everything else, once:

    resume (one path: task, stage and world size checked; says what it resumed)
      -> prepare (accelerate: DDP / DeepSpeed / FSDP) -> evaluation before step 1 (with progress)
      -> steps: micro-batches inside ``accelerator.accumulate`` (so DeepSpeed and DDP see the true
         boundaries), autocast, backward (accelerate divides by the accumulation), clipping at the
         boundary, optimizer, schedule; the LR logged is the one the step ran with
      -> cadence (``progress.due``): log windows, evaluations, atomic checkpoints
      -> final evaluation -> the stage's export.

Progress goes to a callback (``ProgressEvent``) and to accelerate's trackers (``runtime.trackers``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from viq.errors import ConfigError
from viq.train import checkpoint as ckpt
from viq.train.optim import make_optimizer, make_scheduler
from viq.train.progress import ProgressEvent, ProgressFn, due, flat_metrics
from viq.train.stage import DataPosition, Stage

log = logging.getLogger("viq.train")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``message`` says what was kept and how to continue."""

    def __init__(self, message: str, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.message, self.step, self.checkpoint = message, step, checkpoint


@dataclass
class EngineResult:
    steps: int
    total_steps: int
    history: list[dict]  # per optimizer step: lr, loss, terms, counts (deterministic: no timings)
    evals: dict  # "initial" / "step-N" / "final" -> metrics
    last_log: dict
    skipped: list[str]
    skipped_count: int
    last_checkpoint: Optional[Path]
    resumed_from: Optional[Path]
    resumed_step: Optional[int]
    elapsed_s: float
    world_size: int = 1
    notes: list[str] = field(default_factory=list)


class Skips:
    """Bad samples met while training: each reported once and counted once (``events`` counts all)."""

    def __init__(self):
        self.listed: list[str] = []
        self.ids: set = set()
        self.events = 0

    def note(self, key, text: str) -> None:
        self.events += 1
        if key in self.ids:
            return
        self.ids.add(key)
        if len(self.listed) < 1000:
            self.listed.append(text)
        log.warning("skipped %s", text)

    @property
    def count(self) -> int:
        return len(self.ids)

    def state(self) -> dict:
        return {"skipped": self.listed[:100], "skipped_ids": sorted(self.ids, key=str), "skip_events": self.events}

    def load(self, st: dict) -> None:
        self.listed = list(st.get("skipped", []))
        self.ids = set(st.get("skipped_ids", []))
        self.events = int(st.get("skip_events", 0))


class Engine:
    def __init__(self, accelerator, stage: Stage, recipe, out_dir: Path, progress: Optional[ProgressFn] = None,
                 resume: bool = False, eval_at_start: bool = True, fingerprint: str = ""):
        self.acc, self.stage, self.recipe = accelerator, stage, recipe
        self.out = Path(out_dir)
        self.root = self.out / "checkpoints"
        self.progress, self.want_resume, self.eval_at_start = progress, resume, eval_at_start
        self.fingerprint = fingerprint
        o = recipe.optim
        self.total = stage.total_steps()
        self.optimizer = make_optimizer(stage.optimizer_groups(o), o)
        self.scheduler = make_scheduler(self.optimizer, o.schedule, self.total)
        self.step, self.pos = 0, DataPosition()
        self.skips = Skips()
        self.evals: dict = {}
        self.history: list[dict] = []
        self.last_log: dict = {}
        self.last_ckpt: Optional[Path] = None
        self.resumed: Optional[ckpt.Checkpoint] = None
        self.model = stage.model

    # ---- events ----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def emit(self, kind: str, metrics: Optional[dict] = None, samples=(), message: str = "") -> None:
        if self.progress is not None and (kind == "step" or self.is_main):
            self.progress(ProgressEvent(kind, self.step, self.total, metrics or {}, list(samples), message,
                                        self.is_main))

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.pos.epoch, "batch": self.pos.batch,
                "scheduler": self.scheduler.state_dict(), **self.skips.state(), "evals": self.evals,
                "fingerprint": self.fingerprint, "world_size": self.acc.num_processes, "task": self.stage.task,
                "stage": self.recipe.run.stage, "stage_state": self.stage.state()}

    # ---- resume: the one path ------------------------------------------------------------------------
    def _resume(self) -> None:
        """Before ``prepare``: model tensors, optimizer, schedule, position; RNG right before the loop."""
        last = ckpt.latest_checkpoint(self.root)
        if last is None:
            msg = f"nothing to resume in {self.root}: starting at step 1"
            log.info(msg)
            self.emit("resume", {"resumed_from": None}, message=msg)
            return
        c = ckpt.read_checkpoint(last)
        st = c.state
        task, stage = st.get("task"), st.get("stage")
        if task not in (None, self.stage.task) or ("stage" in st and stage != self.recipe.run.stage):
            raise ConfigError(f"{last} was written by run.task {task} stage {stage}, not run.task "
                              f"{self.stage.task} stage {self.recipe.run.stage}: use another run.output_dir, "
                              "or train without --resume")
        if st.get("fingerprint") and self.fingerprint and st["fingerprint"] != self.fingerprint:
            log.warning("%s was written by a different recipe; continuing with this one", last)
        world = int(st.get("world_size", 1))
        if world != self.acc.num_processes:
            log.warning("%s was written by %d process(es), this run has %d: the data shards change, so the "
                        "continuation is not exactly the uninterrupted run", last, world, self.acc.num_processes)
        if int(st["step"]) > self.total:
            raise ConfigError(f"{last} is at step {st['step']}, past this recipe's {self.total} steps")
        self.stage.load_tensors(c.model, str(last))
        opt = c.optimizer_state()
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.pos = DataPosition(int(st["epoch"]), int(st["batch"]))
        self.skips.load(st)
        self.evals = dict(st.get("evals", {}))
        self.stage.load_state(st.get("stage_state") or {})
        self.resumed = c
        msg = (f"resuming from {last}: step {self.step} of {self.total} done (epoch {self.pos.epoch}, "
               f"micro-batch {self.pos.batch}); continuing at step {self.step + 1}")
        log.info(msg)
        self.emit("resume", {"resumed_from": str(last), "step": self.step}, message=msg)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save(self) -> Path:
        """Atomic checkpoint of this step: every process writes its RNG, the main one the rest."""
        acc = self.acc
        if acc.distributed_type.name in ("DEEPSPEED", "FSDP"):
            final = self._save_sharded()
        else:
            def write(tmp):
                ckpt.write_main(tmp, self.stage.state_tensors(), self.optimizer.state_dict(), self._state())

            final = ckpt.save_step(acc, self.root, self.step, write, self.recipe.runtime.keep_last)
        self.last_ckpt = final
        self.emit("save", {"checkpoint": str(final)})
        return final

    def _save_sharded(self) -> Path:
        # ZeRO / FSDP shard the optimizer: accelerate's own writer, into the temporary dir, then renamed.
        acc, root = self.acc, self.root
        tmp = ckpt.tmp_dir(root, self.step)
        if self.is_main:
            ckpt.begin(root, self.step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"))
        ckpt.write_rank_rng(tmp, acc.process_index)
        full = acc.get_state_dict(self.model)
        acc.wait_for_everyone()
        if self.is_main:
            keep = set(self.stage.state_tensors())
            ckpt.write_main(tmp, {k: v for k, v in full.items() if k in keep}, None, {**self._state(), "sharded": True})
            ckpt.commit(tmp, root, self.step)
            ckpt.prune(root, self.recipe.runtime.keep_last)
        acc.wait_for_everyone()
        return ckpt.step_dir(root, self.step)

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, label: str) -> dict:
        total = self.stage.eval_size()
        self.emit("eval_start", {"label": label, "samples": total},
                  message=f"evaluating {total} held-out samples ({label})")

        def tick(done: int, of: int) -> None:
            self.emit("eval_progress", {"label": label, "done": done, "total": of})

        metrics = self.stage.evaluate(self.acc.unwrap_model(self.model), tick)
        if self.is_main:
            from viq.train.progress import format_metrics

            log.info("eval (%s): %s", label, format_metrics(metrics))
        self.acc.log({f"eval/{k}": v for k, v in flat_metrics(metrics).items()}, step=self.step)
        self.emit("eval", {"label": label, **metrics})
        return metrics

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> EngineResult:
        acc, stage = self.acc, self.stage
        t_start = time.time()
        if self.want_resume:
            self._resume()
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        if self.resumed is not None and self.resumed.state.get("sharded", self.resumed.state.get("deepspeed")):
            acc.load_state(str(self.resumed.path / "accelerate"))
        stage.on_device(acc)
        try:
            self._loop()
        except KeyboardInterrupt:
            raise self._interrupted() from None
        if stage.has_eval:
            self.evals["final"] = self.evaluate("final")
        return EngineResult(self.step, self.total, self.history, self.evals, self.last_log, self.skips.listed,
                            self.skips.count, self.last_ckpt, self.resumed.path if self.resumed else None,
                            int(self.resumed.state["step"]) if self.resumed else None, time.time() - t_start,
                            acc.num_processes)

    def _loop(self) -> None:
        """Evaluation before step 1, then the steps with their cadence (Ctrl-C anywhere in here is reported)."""
        acc, stage, o, rt = self.acc, self.stage, self.recipe.optim, self.recipe.runtime
        self.emit("start", {"total_steps": self.total, "resumed_from": str(self.resumed.path) if self.resumed else None})
        if stage.has_eval and self.eval_at_start and stage.eval_at_start and self.step == 0 \
                and "initial" not in self.evals:
            self.evals["initial"] = self.evaluate("initial")
        if self.resumed is not None:
            self.resumed.restore_rng(acc.process_index)  # last: nothing may draw after this
        data = stage.micro_batches(self.pos, self.skips)
        accum = acc.gradient_accumulation_steps
        window: dict[str, list] = {}
        tokens, t_window = 0, time.time()
        self.model.train()
        while self.step < self.total:
            terms: dict[str, float] = {}
            counts: dict[str, int] = {}
            samples: list[int] = []
            grad_norm = None
            lr = self.optimizer.param_groups[0]["lr"]  # the LR this step runs with
            for micro in range(accum):
                batch, pos = next(data)
                batch = stage.to_device(batch, acc.device)
                with acc.accumulate(self.model):
                    if acc.sync_gradients != (micro == accum - 1):
                        raise RuntimeError(f"step {self.step + 1}: accelerate's accumulation boundary is off "
                                           f"(micro-batch {micro + 1} of {accum})")
                    with acc.autocast():
                        out = stage.loss(self.model, batch, self.step)
                    acc.backward(out.loss)
                    if acc.sync_gradients and o.grad_clip:
                        for params in stage.clip_groups():
                            norm = acc.clip_grad_norm_(params, o.grad_clip)
                            if grad_norm is None and norm is not None:
                                grad_norm = float(norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.pos = pos
                value = float(out.loss.detach())
                terms["loss"] = terms.get("loss", 0.0) + value / accum
                for k, v in out.terms.items():
                    terms[k] = terms.get(k, 0.0) + float(v) / accum
                for k, v in out.counts.items():
                    counts[k] = counts.get(k, 0) + int(v)
                samples += out.samples
                tokens += out.counts.get("tokens", 0)
                stage.observe(out)
            self.scheduler.step()
            self.step += 1
            record = {"step": self.step, "lr": lr, **terms, **counts}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"step {self.step}: the loss is {terms['loss']}; lower optim.lr or "
                                         "check the data")
            self.history.append(record)
            for k, v in record.items():
                if k != "step":
                    window.setdefault(k, []).append(v)
            self.emit("step", record, samples)
            if due(rt.log_every, self.step, self.total):
                self.last_log = self._log(window, tokens / max(time.time() - t_window, 1e-9))
                window, tokens, t_window = {}, 0, time.time()
            if stage.has_eval and due(rt.eval_every, self.step, self.total, at_end=False):
                self.evals[f"step-{self.step}"] = self.evaluate(f"step {self.step}")
            if due(rt.save_every, self.step, self.total):
                self.save()

    def _interrupted(self) -> TrainingInterrupted:
        last = ckpt.latest_checkpoint(self.root)
        if last is None:
            kept = "no checkpoint was written yet (runtime.save_every " f"{self.recipe.runtime.save_every})"
            how = "run the same command again to start over"
        else:
            kept = f"the checkpoint {last} (step {int(ckpt.load_json(last / ckpt.STATE_FILE)['step'])}) is kept"
            how = "continue with the same command plus --resume"
        msg = f"interrupted during step {self.step + 1} of {self.total}: {kept}; {how}"
        return TrainingInterrupted(msg, self.step, last)

    def _log(self, window: dict, tokens_per_s: float) -> dict:
        acc = self.acc
        names = sorted(window)
        vals = torch.tensor([sum(window[k]) / len(window[k]) for k in names] + [tokens_per_s, self.skips.count],
                            dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            vals = acc.reduce(vals, "sum")
            n = acc.num_processes
            vals = torch.cat((vals[:len(names)] / n, vals[len(names):]))  # tokens/s and skips add up
        out = dict(zip(names, vals[:len(names)].tolist()))
        out["tokens_per_s"] = float(vals[len(names)])
        out["skipped_samples"] = int(vals[len(names) + 1])
        out.update(self.stage.window_metrics(acc))
        if self.is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float))
            log.info("step %d/%d %s", self.step, self.total, shown)
        acc.log({f"train/{k}": v for k, v in flat_metrics(out).items()}, step=self.step)
        self.emit("log", out)
        return out
