"""The training loop on ``accelerate``: one CPU process, many GPUs, many machines, DeepSpeed ZeRO.

The parts arrive assembled (``viq.train.run``): a ``TrainModel`` (student + MLLM, what trains),
the frozen targets (teacher and VAE), the data sets and the batch plans. The loop runs gradient
accumulation and clipping, the optimizer and schedule of ``viq.train.optim``, logging (loss terms,
LR, tokens/s, codebook usage; TensorBoard when installed), evaluation, and checkpoints that resume
exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from viq.mllm.collate import Batch, BatchPlan, ConversationDataset, Skipped, collate
from viq.train import checkpoint as ckpt
from viq.train.evaluate import EvalSpec, evaluate
from viq.train.losses import CodebookUsage
from viq.train.model import TrainModel, load_exact, trained_state
from viq.train.optim import make_optimizer, make_scheduler
from viq.train.progress import MetricsWriter, ProgressEvent, ProgressFn, due
from viq.train.targets import FrozenTargets

log = logging.getLogger("viq.train")


# ---- data iteration -----------------------------------------------------------------------------


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # index of the next micro-batch within the epoch


def iterate(dataset: ConversationDataset, plan: BatchPlan, pos: DataPosition, num_workers: int
            ) -> Iterator[tuple[Batch, DataPosition]]:
    """Micro-batches forever, from ``pos``; yields each batch with the position after it."""
    while True:
        batches = plan.epoch(pos.epoch)[pos.batch:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=num_workers, generator=torch.Generator(),
                                             persistent_workers=False)
        for batch in loader:
            pos = DataPosition(pos.epoch, pos.batch + 1)
            yield batch, pos
        pos = DataPosition(pos.epoch + 1, 0)


# ---- the loop -------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    total_steps: int
    grad_clip: Optional[float]
    log_every: int
    save_every: int
    keep_last: int
    eval_every: Optional[int]
    num_workers: int
    checkpoint_root: Path
    tensorboard_dir: Optional[Path] = None
    eval_at_start: bool = True
    patch: int = 16
    fingerprint: str = ""


@dataclass
class LoopResult:
    steps: int
    history: list[dict]
    evals: dict  # "initial" / "step-N" / "final" -> metrics
    skipped: list[str]
    skipped_count: int
    last_checkpoint: Optional[Path]
    resumed_from: Optional[Path]
    last_log: dict
    elapsed_s: float


class Trainer:
    def __init__(self, accelerator, model: TrainModel, targets: FrozenTargets, dataset: ConversationDataset,
                 plan: BatchPlan, cfg: LoopConfig, optim_cfg, schedule_cfg, eval_spec: Optional[EvalSpec] = None,
                 progress: Optional[ProgressFn] = None):
        self.acc = accelerator
        self.raw_model = model
        self.targets = targets
        self.dataset, self.plan, self.cfg = dataset, plan, cfg
        self.eval_spec = eval_spec
        self.progress = progress
        self.optimizer = make_optimizer(model, optim_cfg)
        self.scheduler = make_scheduler(self.optimizer, schedule_cfg, cfg.total_steps)
        self.step = 0
        self.pos = DataPosition()
        self.skipped: list[str] = []
        self.skipped_count = 0
        self.skip_events = 0
        self._skipped_ids: set[int] = set()
        self.evals: dict = {}
        self.history: list[dict] = []
        self.resumed_from: Optional[Path] = None
        self.writer = MetricsWriter(None)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _emit(self, kind: str, metrics: Optional[dict] = None, samples=(), message: str = "") -> None:
        if self.progress is None:
            return
        if kind == "step" or self.is_main:
            self.progress(ProgressEvent(kind, self.step, self.cfg.total_steps, metrics or {}, list(samples), message,
                                        self.is_main))

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.pos.epoch, "batch": self.pos.batch,
                "scheduler": self.scheduler.state_dict(), "skipped_count": self.skipped_count,
                "skipped": self.skipped[:100], "skipped_ids": sorted(self._skipped_ids), "skip_events": self.skip_events,
                "evals": self.evals, "fingerprint": self.cfg.fingerprint,
                "world_size": self.acc.num_processes}

    # -- checkpoints --------------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        """Before ``prepare``: load model, optimizer, scheduler, position; RNG right before the loop."""
        c = ckpt.read_checkpoint(path)
        st = c.state
        if st.get("fingerprint") and self.cfg.fingerprint and st["fingerprint"] != self.cfg.fingerprint:
            log.warning("resuming %s: the recipe differs from the one that wrote it", path)
        if st.get("world_size", 1) != self.acc.num_processes:
            log.warning("resuming %s written by %d process(es) with %d: the data shards change", path,
                        st.get("world_size", 1), self.acc.num_processes)
        load_exact(self.raw_model, c.model, str(path))
        opt = c.optimizer_state()
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.pos = DataPosition(int(st["epoch"]), int(st["batch"]))
        self.skipped_count = int(st.get("skipped_count", 0))
        self.skipped = list(st.get("skipped", []))
        self._skipped_ids = set(st.get("skipped_ids", []))
        self.skip_events = int(st.get("skip_events", 0))
        self.evals = dict(st.get("evals", {}))
        self._resume_ckpt = c
        self.resumed_from = Path(path)

    def save(self) -> Path:
        """Atomic checkpoint of this step: every process writes its RNG, the main one the rest."""
        root = self.cfg.checkpoint_root
        acc = self.acc
        if acc.distributed_type.name == "DEEPSPEED":
            return self._save_deepspeed()
        def write(tmp):
            model = acc.unwrap_model(self.model)
            ckpt.write_main(tmp, trained_state(model), self.optimizer.state_dict(), self._state())

        final = ckpt.save_step(acc, root, self.step, write, self.cfg.keep_last)
        self._emit("save", {"checkpoint": str(final)})
        return final

    def _save_deepspeed(self) -> Path:
        # ZeRO shards the optimizer: accelerate's own writer, into the temporary dir, then renamed.
        root = self.cfg.checkpoint_root
        tmp = ckpt.tmp_dir(root, self.step)
        if self.is_main:
            ckpt.begin(root, self.step)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp / "accelerate"))
        ckpt.write_rank_rng(tmp, self.acc.process_index)
        state = self.acc.get_state_dict(self.model)
        self.acc.wait_for_everyone()
        if self.is_main:
            model = self.acc.unwrap_model(self.model)
            keep = set(trained_state(model))
            ckpt.write_main(tmp, {k: v for k, v in state.items() if k in keep}, None,
                            {**self._state(), "deepspeed": True})
            ckpt.commit(tmp, root, self.step)
            ckpt.prune(root, self.cfg.keep_last)
        self.acc.wait_for_everyone()
        return ckpt.step_dir(root, self.step)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        acc, cfg = self.acc, self.cfg
        t_start = time.time()
        deepspeed_resume = getattr(self, "_resume_ckpt", None) is not None and \
            self._resume_ckpt.state.get("deepspeed")
        self.model, self.optimizer = acc.prepare(self.raw_model, self.optimizer)
        if deepspeed_resume:
            acc.load_state(str(self._resume_ckpt.path / "accelerate"))
        self.targets.to(acc.device)
        self.writer = MetricsWriter(cfg.tensorboard_dir if self.is_main else None)
        usage = None
        student = self.raw_model.student
        if student is not None and student.codebook_size:
            usage = CodebookUsage(student.codebook_size, acc.device)
        self._emit("start", {"resumed_from": str(self.resumed_from) if self.resumed_from else None})
        if self.eval_spec is not None and cfg.eval_at_start and self.step == 0 and "initial" not in self.evals:
            self.evals["initial"] = self._evaluate("initial")
        if getattr(self, "_resume_ckpt", None) is not None:
            self._resume_ckpt.restore_rng(acc.process_index)  # last: nothing may draw after this
        data = iterate(self.dataset, self.plan, self.pos, cfg.num_workers)
        window: dict[str, list] = {}
        tokens_seen, t_window = 0, time.time()
        last_ckpt = None
        accum = acc.gradient_accumulation_steps
        self.model.train()
        while self.step < cfg.total_steps:
            step_terms: dict[str, float] = {}
            step_samples: list[int] = []
            grad_norm = None
            for _ in range(accum):
                batch, pos = next(data)
                self._note_skipped(batch.skipped)
                batch = batch.to(acc.device)
                step_samples += batch.indices
                with acc.accumulate(self.model):
                    tf = tl = None
                    if batch.images and self.raw_model.plan.pool_from is not None:
                        tf = self.targets.teacher_features(batch.images, batch.image_keys).to(acc.device)
                    if batch.images and self.raw_model.plan.draw:
                        tl = self.targets.latents(batch.images, batch.image_keys)
                    with acc.autocast():
                        total, terms, stats = self.model(batch, tf, tl)
                    acc.backward(total)
                    if acc.sync_gradients and cfg.grad_clip:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.pos = pos
                for k, v in terms.items():
                    step_terms[k] = step_terms.get(k, 0.0) + float(v.detach()) / accum
                step_terms["loss"] = step_terms.get("loss", 0.0) + float(total.detach()) / accum
                tokens_seen += batch.patch_tokens(cfg.patch) + stats["lm_tokens"]
                if usage is not None:
                    usage.update(stats["indices"])
            self.scheduler.step()
            self.step += 1
            lr = self.optimizer.param_groups[0]["lr"]
            record = {"step": self.step, "lr": lr, **step_terms}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            self.history.append(record)
            for k, v in record.items():
                if k != "step":
                    window.setdefault(k, []).append(v)
            self._emit("step", record, step_samples)
            if due(cfg.log_every, self.step, cfg.total_steps):
                elapsed = max(time.time() - t_window, 1e-9)
                self.last_log = self._log(window, usage, tokens_seen / elapsed)
                window, tokens_seen, t_window = {}, 0, time.time()
            if self.eval_spec is not None and due(cfg.eval_every, self.step, cfg.total_steps, at_end=False):
                self.evals[f"step-{self.step}"] = self._evaluate(f"step {self.step}")
            if due(cfg.save_every, self.step, cfg.total_steps):
                last_ckpt = self.save()
        if self.eval_spec is not None:
            self.evals["final"] = self._evaluate("final")
        self.writer.close()
        self._emit("end", {"evals": self.evals})
        return LoopResult(self.step, self.history, self.evals, self.skipped, self.skipped_count, last_ckpt,
                          self.resumed_from, getattr(self, "last_log", {}), time.time() - t_start)

    def _note_skipped(self, skipped: list[Skipped]) -> None:
        """Each bad sample is reported once (with index and reason) and counted once; later epochs
        skip it again silently (``skip_events`` counts every time)."""
        for s in skipped:
            self.skip_events += 1
            if s.index in self._skipped_ids:
                continue
            self._skipped_ids.add(s.index)
            self.skipped_count += 1
            if len(self.skipped) < 1000:
                self.skipped.append(str(s))
            log.warning("skipped %s", s)

    def _log(self, window: dict, usage: Optional[CodebookUsage], tokens_per_s: float) -> dict:
        acc = self.acc
        names = sorted(window)
        vals = torch.tensor([sum(window[k]) / len(window[k]) for k in names] + [tokens_per_s, self.skipped_count],
                            dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            vals = acc.reduce(vals, "sum")
            n = acc.num_processes
            vals = torch.cat((vals[:len(names)] / n, vals[len(names):]))  # tokens/s and skips add up
        out = dict(zip(names, vals[:len(names)].tolist()))
        out["tokens_per_s"] = float(vals[len(names)])
        out["skipped_samples"] = int(vals[len(names) + 1])
        if usage is not None:
            counts = usage.counts
            if acc.num_processes > 1:
                counts = acc.reduce(counts.clone(), "sum")
            out.update(CodebookUsage.stats(counts))
            usage.reset()
        if self.is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float))
            log.info("step %d/%d %s", self.step, self.cfg.total_steps, shown)
            self.writer.scalars("train", out, self.step)
        self._emit("log", out)
        return out

    def _evaluate(self, label: str) -> dict:
        metrics = evaluate(self.acc.unwrap_model(self.model) if hasattr(self, "model") else self.raw_model,
                           self.targets, self.eval_spec, self.acc)
        self.writer.eval_done(label, metrics, self.step, self.is_main)
        self._emit("eval", {"label": label, **metrics})
        return metrics
