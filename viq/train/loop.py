"""The training loop on ``accelerate``: one CPU process, many GPUs, many machines, DeepSpeed ZeRO.

The parts arrive assembled (``viq.train.run``): a ``TrainModel`` (student + MLLM, what trains),
the frozen targets (teacher and VAE), the data sets and the batch plans. This module owns the
optimizer (AdamW, no decay on biases, norms and embeddings-like vectors), the schedule (warmup,
cosine to a floor), gradient accumulation and clipping, logging (loss terms, LR, tokens/s, codebook
usage; TensorBoard when installed), evaluation, and checkpoints that resume exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.mllm.collate import Batch, BatchPlan, ConversationDataset, Skipped, collate
from viq.mllm.model import MLLM
from viq.model.student import Student
from viq.train import checkpoint as ckpt
from viq.train.losses import CodebookUsage, distill_loss, latent_mse, weighted_total

log = logging.getLogger("viq.train")


# ---- progress reporting -----------------------------------------------------------------------


@dataclass
class ProgressEvent:
    """What the loop tells a progress callback (main process only, except ``sample_indices``)."""

    kind: str  # start | step | log | eval | save | end
    step: int
    total: int
    metrics: dict = field(default_factory=dict)
    sample_indices: list[int] = field(default_factory=list)  # this process's samples of the step
    message: str = ""
    main: bool = True  # sent by the main process (a progress bar should show only these)


ProgressFn = Callable[[ProgressEvent], None]


# ---- frozen targets ---------------------------------------------------------------------------


class FrozenTargets:
    """Teacher MAP features and VAE posterior means: frozen, deterministic, cached per image.

    The VAE sees each image zero-padded to its patch grid (as the ViT does), so its latent grid is
    exactly the drawer's (2h, 2w). Each image is computed alone, so a value never depends on the
    batch it came with: cached and recomputed values are bit-identical (exact resumes).
    """

    def __init__(self, teacher: Optional[nn.Module], vae: Optional[nn.Module], patch: int,
                 cache_limit: int = 100_000):
        self.teacher, self.vae, self.patch = teacher, vae, patch
        self.cache_limit = cache_limit
        self._teacher: dict = {}
        self._latent: dict = {}

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "FrozenTargets":
        for m in (self.teacher, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
        return self

    def _cached(self, store: dict, keys, images, fn) -> list[torch.Tensor]:
        out = []
        for key, img in zip(keys, images):
            hit = store.get(key)
            if hit is None:
                hit = fn(img)
                if len(store) < self.cache_limit:
                    store[key] = hit
            out.append(hit)
        return out

    @torch.no_grad()
    def teacher_features(self, images: Sequence[torch.Tensor], keys) -> torch.Tensor:
        feats = self._cached(self._teacher, keys, images, lambda im: self.teacher([im])[0])
        return torch.stack(feats)

    @torch.no_grad()
    def _latent_of(self, img: torch.Tensor) -> torch.Tensor:
        p = self.patch
        _, hgt, wid = img.shape
        x = F.pad(img, (0, (p - wid % p) % p, 0, (p - hgt % p) % p))
        dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(x[None, :, None].to(dtype)).latent_dist.mean  # (1, z, 1, H/8, W/8)
        return mean[:, :, 0].float()

    @torch.no_grad()
    def latents(self, images: Sequence[torch.Tensor], keys) -> list[torch.Tensor]:
        return self._cached(self._latent, keys, images, self._latent_of)


# ---- the trained model ------------------------------------------------------------------------


@dataclass
class LossPlan:
    weights: dict[str, float]
    pool_from: Optional[str]  # None | head | vit
    draw: bool
    feat_rec: bool
    vit_grad: bool


class TrainModel(nn.Module):
    """Everything that trains, as one module (what DDP/DeepSpeed wrap)."""

    def __init__(self, student: Optional[Student], mllm: Optional[MLLM], plan: LossPlan):
        super().__init__()
        self.student, self.mllm, self.plan = student, mllm, plan

    def forward(self, batch: Batch, teacher_feats: Optional[torch.Tensor] = None,
                target_latents: Optional[list[torch.Tensor]] = None):
        """(total loss, {term: value}, stats). Stats hold detached counts and the code indices."""
        plan = self.plan
        terms: dict[str, torch.Tensor] = {}
        stats: dict = {"indices": None, "lm_tokens": 0, "supervised": 0, "correct": 0.0}
        if batch.n_samples == 0:  # every sample of this micro-batch was skipped: a zero step
            zero = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
            return zero, {}, stats
        feats, grids = [], []
        if batch.images and self.student is not None:
            out = self.student(batch.images, pool_from=plan.pool_from, draw=plan.draw, feat_rec=plan.feat_rec,
                               vit_grad=plan.vit_grad)
            if plan.pool_from is not None:
                terms["cls_distill"] = distill_loss(out.pooled, teacher_feats)
            if plan.draw:
                terms["rec_latent_mse"] = latent_mse(out.latents, target_latents)
            if self.student.head is not None and plan.weights.get("commit"):
                terms["commit"] = out.aux_loss
            if plan.feat_rec and out.feat_rec is not None:
                terms["feat_rec"] = out.feat_rec
            feats, grids = out.packing.split(out.features), list(out.packing.grids)
            stats["indices"] = out.indices
        if self.mllm is not None:
            lm = self.mllm(batch.input_ids, batch.labels, batch.image_positions, self.mllm.project(feats, grids))
            terms["lm_ce"] = lm.loss
            stats.update(lm_tokens=lm.n_tokens, supervised=lm.n_supervised, correct=float(lm.n_correct))
        total = weighted_total(terms, plan.weights) if any(plan.weights.get(k) for k in terms) else None
        if total is None:
            total = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return total, terms, stats


# ---- optimizer and schedule -------------------------------------------------------------------

_NO_DECAY_NAMES = ("pos_embed", "attn_pool.latent", "image_newline", "image_begin", "image_end", "post_scale",
                   "post_shift", "codebook")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices; none for biases, norms and vector parameters.

    Unlike the reference (§7.23) the position grid, the MAP latent, the LayerNorm-trick scale and
    the projector's special vectors are not decayed either.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, norm_types) or type(module).__name__.endswith("RMSNorm"):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or id(p) in no_decay_ids or name.endswith(".bias") or any(s in name for s in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires gradients")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.lr_factor(s, total_steps))


# ---- state selection ----------------------------------------------------------------------------


def trained_state(model: TrainModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: everything of the model except what is frozen and rebuilt
    identically from its source (the drawer's VAE, the frozen base LLM under LoRA). Tensors shared
    under two names (tied embeddings) are stored once."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith("student.drawer.vae."):
            continue
        if name.startswith("mllm.llm.") and name not in trainable:
            continue
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t.detach()
    return out


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


def to_device(batch: Batch, device) -> Batch:
    batch.images = [t.to(device, non_blocking=True) for t in batch.images]
    return batch


# ---- evaluation -----------------------------------------------------------------------------------


@dataclass
class EvalSpec:
    dataset: ConversationDataset
    micro_batch: int
    tokenizer: object
    eos_id: Optional[int]
    limit: Optional[int] = None
    generate: bool = True  # greedy captions scored by attribute (synthetic data with meta)
    max_new_tokens: int = 24


ATTRIBUTES = ("shape", "colour", "size", "position")


def _decode(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_specials=True)
    except TypeError:
        return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model: TrainModel, targets: FrozenTargets, spec: EvalSpec, accelerator) -> dict:
    """Held-out metrics, each process on its share of the samples, summed across processes.

    caption_token_accuracy: teacher-forced argmax accuracy on answer tokens, the image entering as
    its (quantized) codes. attribute_accuracy: greedy captions parsed back into the synthetic
    attributes (only for samples that carry them). latent_mse: drawer latent vs VAE posterior mean.
    """
    from viq.data.synthetic import parse_caption

    was_training = model.training
    model.eval()
    n = len(spec.dataset) if spec.limit is None else min(spec.limit, len(spec.dataset))
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    device = accelerator.device
    sums = {k: 0.0 for k in ("lm_ce_sum", "supervised", "correct", "rec_sum", "rec_images", "cos_sum", "cos_images",
                             "skipped", *(f"attr_{a}" for a in ATTRIBUTES), "attr_samples")}
    student, mllm = model.student, model.mllm
    plan = model.plan
    usage = CodebookUsage(student.codebook_size, device) if student is not None and student.codebook_size else None
    lat_stats = None  # per latent channel: count, sum, sum of squares of the targets
    for start in range(0, len(mine), spec.micro_batch):
        batch = to_device(collate([spec.dataset[i] for i in mine[start:start + spec.micro_batch]]), device)
        sums["skipped"] += len(batch.skipped)
        if batch.n_samples == 0:
            continue
        with accelerator.autocast():
            feats, grids = [], []
            if batch.images and student is not None:
                out = student(batch.images, pool_from=plan.pool_from, draw=plan.draw)
                if plan.draw:
                    tl = targets.latents(batch.images, batch.image_keys)
                    for p, t in zip(out.latents, tl):
                        t = t.to(p.device).reshape(p.shape).float()
                        sums["rec_sum"] += float(F.mse_loss(p.float(), t))
                        sums["rec_images"] += 1
                        flat = t.transpose(0, 1).reshape(t.shape[1], -1).double()
                        part = torch.stack((torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1),
                                            flat.square().sum(1)))
                        lat_stats = part if lat_stats is None else lat_stats + part
                if plan.pool_from is not None:
                    tf = targets.teacher_features(batch.images, batch.image_keys).to(device)
                    sums["cos_sum"] += float(F.cosine_similarity(out.pooled.float(), tf, dim=-1).sum())
                    sums["cos_images"] += len(batch.images)
                if usage is not None:
                    usage.update(out.indices)
                feats, grids = out.packing.split(out.features), list(out.packing.grids)
            if mllm is not None:
                embeds = mllm.project(feats, grids)
                lm = mllm(batch.input_ids, batch.labels, batch.image_positions, embeds)
                sums["lm_ce_sum"] += float(lm.loss) * lm.n_supervised
                sums["supervised"] += lm.n_supervised
                sums["correct"] += float(lm.n_correct)
                if spec.generate:
                    _generate_and_score(mllm, batch, embeds, spec, sums, parse_caption)
    totals = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    s = dict(zip(sums, totals.tolist()))
    metrics: dict = {"samples": n, "skipped": int(s["skipped"])}
    if s["supervised"]:
        metrics["caption_token_accuracy"] = s["correct"] / s["supervised"]
        metrics["lm_ce"] = s["lm_ce_sum"] / s["supervised"]
    if s["rec_images"]:
        metrics["latent_mse"] = s["rec_sum"] / s["rec_images"]
    if lat_stats is not None or (accelerator.num_processes > 1 and s["rec_images"]):
        # What predicting one constant per latent channel would score: the bar a drawer must beat to
        # show it reconstructs the image rather than the data set's average.
        if lat_stats is None:
            lat_stats = torch.zeros(3, model.student.cfg.drawer.vae.z_dim, dtype=torch.float64, device=device)
        if accelerator.num_processes > 1:
            lat_stats = accelerator.reduce(lat_stats, "sum")
        n, sm, sq = lat_stats
        metrics["latent_mse_constant_baseline"] = float((sq / n - (sm / n) ** 2).mean())
    if s["cos_images"]:
        metrics["distill_cosine"] = s["cos_sum"] / s["cos_images"]
    if s["attr_samples"]:
        acc = {a: s[f"attr_{a}"] / s["attr_samples"] for a in ATTRIBUTES}
        acc["mean"] = sum(acc.values()) / len(ATTRIBUTES)
        metrics["attribute_accuracy"] = acc
        metrics["attribute_samples"] = int(s["attr_samples"])
    if usage is not None:
        counts = usage.counts
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, "sum")
        metrics.update(CodebookUsage.stats(counts))
    model.train(was_training)
    return metrics


def _generate_and_score(mllm: MLLM, batch: Batch, embeds, spec: EvalSpec, sums: dict, parse_caption) -> None:
    k = 0
    for ids, labels, pos, meta in zip(batch.input_ids, batch.labels, batch.image_positions, batch.meta):
        imgs = embeds[k:k + len(pos)]
        k += len(pos)
        if not all(a in meta for a in ATTRIBUTES):
            continue
        first = next((i for i, lab in enumerate(labels) if lab != -100), None)
        if first is None:
            continue
        prompt_pos = [p for p in pos if p < first]
        out = mllm.generate(ids[:first], prompt_pos, imgs[:len(prompt_pos)], spec.max_new_tokens, spec.eos_id)
        got = parse_caption(_decode(spec.tokenizer, out))
        sums["attr_samples"] += 1
        for a in ATTRIBUTES:
            sums[f"attr_{a}"] += float(got is not None and getattr(got, a) == meta[a])


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
        self.writer = None

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
        if cfg.tensorboard_dir is not None and self.is_main:
            self.writer = _tensorboard(cfg.tensorboard_dir)
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
                batch = to_device(batch, acc.device)
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
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                elapsed = max(time.time() - t_window, 1e-9)
                self.last_log = self._log(window, usage, tokens_seen / elapsed)
                window, tokens_seen, t_window = {}, 0, time.time()
            if self.eval_spec is not None and cfg.eval_every and self.step % cfg.eval_every == 0 \
                    and self.step != cfg.total_steps:
                self.evals[f"step-{self.step}"] = self._evaluate(f"step {self.step}")
            if self.step % cfg.save_every == 0 or self.step == cfg.total_steps:
                last_ckpt = self.save()
        if self.eval_spec is not None:
            self.evals["final"] = self._evaluate("final")
        if self.writer is not None:
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
            if self.writer is not None:
                for k, v in out.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
        self._emit("log", out)
        return out

    def _evaluate(self, label: str) -> dict:
        metrics = evaluate(self.acc.unwrap_model(self.model) if hasattr(self, "model") else self.raw_model,
                           self.targets, self.eval_spec, self.acc)
        if self.is_main:
            log.info("eval (%s): %s", label, _fmt(metrics))
            if self.writer is not None:
                for k, v in _flat(metrics).items():
                    self.writer.add_scalar(f"eval/{k}", v, self.step)
        self._emit("eval", {"label": label, **metrics})
        return metrics


def load_exact(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Resume: every checkpointed tensor must exist with its shape, and every trained one be present."""
    expected = trained_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        from viq.errors import KeyMismatchError

        raise KeyMismatchError(f"{where} (resume)", missing, unexpected,
                               [f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}" for k in wrong])
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k].to(t.dtype))


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        log.info("tensorboard is not installed; no event files written")
        return None
    return SummaryWriter(str(path))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in _flat(metrics).items())


def total_steps(optim, steps_per_epoch: int) -> int:
    if optim.max_steps is not None:
        return int(optim.max_steps)
    return max(1, math.floor(optim.epochs * steps_per_epoch / optim.grad_accum))
