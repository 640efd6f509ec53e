"""The tokenizer stages (``run.task: tokenizer``: stages 1, 2-1, 2-2 and single-stage recipes).

    images ─student (ViT + head + quantizer + drawer)─▶ codes/features ─projector─▶ LLM ─▶ CE on answers
                                                     └─ distillation to the frozen teacher, latent MSE to the VAE

Outputs under ``recipe.out_dir``: ``model.safetensors`` (trained tensors in training names: what the
next stage loads), ``training.json``, ``tokenizer.json`` (word tokenizer of tiny runs), ``viq/`` (FSQ
runs: the inference model's ``state_dict()`` in viq's weights format), ``metrics.json`` and
``init-report.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from viq.data.conversations import Resize, WordTokenizer
from viq.errors import ConfigError
from viq.mllm.collate import BatchPlan, ConversationDataset, collate, placeholder_id
from viq.train.build import (apply_init, build_mllm, build_student, build_target_vae, init_tensors,
                             quantizer_projections, _arch_vit, _grouped)
from viq.train.evaluate import EvalSpec, evaluate
from viq.train.losses import CodebookUsage
from viq.train.model import LossPlan, TrainModel, load_exact, trained_state
from viq.train.optim import total_steps
from viq.train.setup import eos_id, make_tokenizer, read_data, recipe_fingerprint
from viq.train.stage import DataPosition, Export, Stage, StepOutput
from viq.train.targets import FrozenTargets
from viq.train.teacher import build_teacher
from viq.weights.io import write_json, write_safetensors

log = logging.getLogger("viq.train")

STATE_FILE = "model.safetensors"
INFO_FILE = "training.json"


def iterate(dataset: ConversationDataset, plan: BatchPlan, pos: DataPosition, num_workers: int
            ) -> Iterator[tuple[object, DataPosition]]:
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


class TokenizerStage(Stage):
    task = "tokenizer"
    eval_at_start = True

    @staticmethod
    def check(recipe) -> None:
        if recipe.llm is None:
            raise ConfigError("training without an LLM (llm: null) is not implemented yet: the data path needs a "
                              "tokenizer")

    def __init__(self, recipe, acc, out: Path, resume: bool, eval_limit: Optional[int]):
        self.recipe, self.acc, self.out = recipe, acc, out
        seed = recipe.run.seed
        init_dir = recipe.init_path if recipe.init.stage else None
        d = recipe.data
        self.train_set = read_data(d.path, d.image_root, d.sample_fraction, d.max_bad_fraction, "train", recipe)
        val_set = read_data(d.val_path, d.image_root, None, d.max_bad_fraction, "val", recipe) if d.val_path else None
        self.val_set = val_set
        tokenizer = make_tokenizer(recipe, [s for s in (self.train_set, val_set) if s is not None],
                                   [p for p in (out if resume else None, init_dir) if p is not None])
        if isinstance(tokenizer, WordTokenizer) and acc.is_main_process:
            # now, so that a resumed run reads the same vocabulary; atomically, other processes may read it
            tokenizer.save(out / ".tokenizer.json.tmp")
            os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")
        self.tokenizer = tokenizer

        # model: the student, the MLLM around it, the frozen targets
        cfg = recipe.model
        vae = None
        if recipe.decoder.enabled:
            vae, cfg = build_target_vae(recipe, cfg, seed + 3)
        self.cfg = cfg
        student = build_student(recipe, cfg)
        if vae is not None:
            own = student.drawer.vae.state_dict()
            full = vae.state_dict()
            student.drawer.vae.load_state_dict({k: full[k] for k in own})  # the drawer decodes with the same VAE
        teacher = build_teacher(recipe.teacher, cfg.vit, _arch_vit(recipe), seed) if recipe.teacher.enabled else None
        mllm = build_mllm(recipe, cfg, len(tokenizer))
        L = recipe.losses
        plan = LossPlan(weights={"lm_ce": L.lm_ce, "cls_distill": L.cls_distill.weight if L.cls_distill.enabled else 0.0,
                                 "rec_latent_mse": L.rec_latent_mse, "commit": L.commit, "feat_rec": L.feat_rec},
                        pool_from=L.cls_distill.source if L.cls_distill.enabled else None, draw=recipe.decoder.enabled,
                        feat_rec=L.feat_rec > 0, vit_grad=True, distill_max_res=L.cls_distill.max_res)
        self.model = TrainModel(student, mllm, plan)
        self.student = student

        self.init_report = None
        if recipe.init_path is not None:
            tensors, fmt, notes = init_tensors(recipe, recipe.init_path)
            rep = apply_init(self.model, tensors, recipe.init.reinit_mismatched, str(recipe.init_path), fmt, notes)
            if acc.is_main_process:
                log.info("starting weights: %s", rep.summary())
                if rep.reinitialised:
                    log.info("re-initialised on purpose (shape changed): %s", "; ".join(rep.reinitialised))
                if rep.fresh:
                    log.info("initialised fresh: %s", _grouped(rep.fresh))
                write_json(rep.as_dict(), out / "init-report.json")
            self.init_report = rep

        f, has_head = recipe.freeze, recipe.quantizer is not None
        student.set_trainable(vit=not f.vit, vit_mlp_norm=not f.vit_mlp_and_norm,
                              pool=not f.attn_pool and L.cls_distill.enabled,
                              head=has_head and not f.head, head_pre_blocks=not (has_head and f.head_pre_blocks),
                              drawer=recipe.decoder.enabled)
        plan.vit_grad = any(p.requires_grad for n, p in student.vit.named_parameters()
                            if n.startswith(("blocks.", "patch")))
        if recipe.runtime.gradient_checkpointing:
            student.set_grad_checkpointing(True)
            mllm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen_dtype = torch.bfloat16 if acc.device.type == "cuda" and recipe.runtime.precision == "bf16" else None
        self.targets = FrozenTargets(teacher, vae, cfg.vit.patch).to("cpu", frozen_dtype)

        # data sets and batch plans
        resize = Resize(base=d.default_resize.base, patch=d.default_resize.patch)
        tok_id = placeholder_id(tokenizer)

        def dataset(samples, name):
            return ConversationDataset(samples.samples, tokenizer, recipe.llm.template, resize, recipe.llm.max_length,
                                       cfg.vit.patch, mllm.projector.num_tokens, tok_id, name=name)

        self.train_ds = dataset(self.train_set, "train")
        counts = [self.train_ds.patch_tokens(i) for i in range(len(self.train_ds))] if d.max_tokens_per_batch else None
        self.plan = BatchPlan(len(self.train_ds), d.micro_batch_size, acc.num_processes, acc.process_index, seed,
                              d.shuffle, counts, d.max_tokens_per_batch)
        self.steps = total_steps(recipe.optim, self.plan.steps_per_epoch())
        self.eval_spec = None
        if val_set is not None:
            self.eval_spec = EvalSpec(dataset(val_set, "val"), d.micro_batch_size, tokenizer,
                                      eos_id(tokenizer, recipe.llm.template), eval_limit)
        self.has_eval = self.eval_spec is not None
        self.usage = CodebookUsage(student.codebook_size, acc.device) if student.codebook_size else None
        if acc.is_main_process:
            n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("%s%s: %d optimizer steps, %d trainable parameters, %d process(es), %d train samples (%d bad)",
                     recipe.run.name, f" stage {recipe.run.stage}" if recipe.run.stage else "", self.steps, n_train,
                     acc.num_processes, len(self.train_set), len(self.train_set.bad))

    # ---- what the engine asks ----
    def total_steps(self) -> int:
        return self.steps

    def clip_groups(self):
        """The trainable parameters in module order, except that a training-only bottleneck's projections
        stand where the head's idle FSQ projections are: the clipped norm sums in the same order (bit for
        bit) as when the bottleneck replaced those projections inside the head."""
        student = self.student
        if student.bottleneck is None:
            return super().clip_groups()
        stand_in = {}
        for name in ("project_in", "project_out"):
            for idle, used in zip(getattr(student.head, name).parameters(), getattr(student.bottleneck, name).parameters()):
                stand_in[id(idle)] = used
        moved = {id(p) for p in student.bottleneck.parameters()}
        params = [stand_in.get(id(p), p) for p in self.model.parameters() if id(p) not in moved]
        return [[p for p in params if p.requires_grad]]

    def micro_batches(self, pos, skips):
        for batch, after in iterate(self.train_ds, self.plan, pos, self.recipe.data.num_workers):
            for s in batch.skipped:
                skips.note(s.index, str(s))
            yield batch, after

    def on_device(self, acc) -> None:
        self.targets.to(acc.device)

    def loss(self, model, batch, step: int) -> StepOutput:
        plan, dev = self.model.plan, self.acc.device
        tf = tl = None
        if batch.images and plan.pool_from is not None:
            tf = self.targets.teacher_features(batch.images, batch.image_keys).to(dev)
        if batch.images and plan.draw:
            tl = self.targets.latents(batch.images, batch.image_keys)
        total, terms, stats = model(batch, tf, tl)
        return StepOutput(total, {k: v.detach() for k, v in terms.items()},
                          {"tokens": batch.patch_tokens(self.cfg.vit.patch) + stats["lm_tokens"]},
                          list(batch.indices), {"indices": stats["indices"]})

    def observe(self, out: StepOutput) -> None:
        if self.usage is not None and out.stats.get("indices") is not None:
            self.usage.update(out.stats["indices"])

    def window_metrics(self, acc) -> dict:
        if self.usage is None:
            return {}
        counts = self.usage.counts
        if acc.num_processes > 1:
            counts = acc.reduce(counts.clone(), "sum")
        self.usage.reset()
        return CodebookUsage.stats(counts)

    def eval_size(self) -> int:
        spec = self.eval_spec
        return len(spec.dataset) if spec.limit is None else min(spec.limit, len(spec.dataset))

    def evaluate(self, model, tick) -> dict:
        return evaluate(model, self.targets, self.eval_spec, self.acc, tick)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return trained_state(self.model)

    def load_tensors(self, tensors, where: str) -> None:
        # a 2-1 checkpoint written while the bottleneck stood inside the head names it head.project_*
        load_exact(self.model, quantizer_projections(tensors, self.model.state_dict()), where)

    # ---- outputs ----
    def export(self, result) -> Export:
        recipe, acc, out, student = self.recipe, self.acc, self.out, self.student
        metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "task": self.task, "steps": result.steps,
                   "elapsed_s": round(result.elapsed_s, 2), "processes": acc.num_processes,
                   "train": result.last_log, "eval": result.evals,
                   "skipped_samples": result.skipped_count + len(self.train_set.bad),
                   "bad_in_data_file": [str(b) for b in self.train_set.bad[:100]],
                   "skipped_at_load": result.skipped[:100]}
        if self.val_set is not None and any("attribute_accuracy" in v for v in result.evals.values()):
            from viq.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES

            chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "size": 1 / len(SIZES),
                      "position": 1 / len(POSITIONS)}
            chance["mean"] = sum(chance.values()) / 4
            metrics["attribute_chance"] = chance
        rep = self.init_report
        if rep is not None:
            metrics["init"] = {"source": rep.source, "loaded": rep.loaded, "reinitialised": rep.reinitialised,
                               "fresh": len(rep.fresh)}
        state_path = out / STATE_FILE
        viq_dir = out / "viq" if student.kind == "fsq" else None
        if acc.is_main_process:
            fingerprint = recipe_fingerprint(recipe)
            write_safetensors(trained_state(self.model), state_path, metadata={"format": "viq-training-state"})
            info = {"format": "viq-training-state", "version": 1, "stage": recipe.run.stage,
                    "quantizer": student.kind, "codebook_size": student.codebook_size, "steps": result.steps,
                    "vocab_size": len(self.tokenizer), "model": self.cfg.model_dump(mode="json"),
                    "fingerprint": fingerprint}
            if viq_dir is not None:
                from viq.weights.save import save_viq

                save_viq(student.viq_state(), self.cfg, viq_dir,
                         source_info={"kind": "viq-training", "recipe": recipe.run.name, "stage": recipe.run.stage,
                                      "steps": result.steps, "fingerprint": fingerprint,
                                      # a random frozen VAE makes the drawer's pictures meaningless: say so
                                      "drawer_vae": recipe.decoder.vae_path or "random"})
                info["viq_dir"] = "viq"
            write_json(info, out / INFO_FILE)
            write_json(metrics, out / "metrics.json")
        return Export(metrics, state_path, viq_dir)

    def skipped_in_file(self) -> list[str]:
        return [str(b) for b in self.train_set.bad]
