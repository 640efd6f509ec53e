"""The offline MLLM stage (``run.task: mllm_offline``): LLM + projector (+ LoRA) trained on a code store.

    conversations (data.path) ─encode_conversation─▶ ids/labels ─┐
    img_path ─CodeStore (data.code_store, made by `viqctl encode`)─▶ codes ─┤ packed rows (viq.mllm.offline)
    codes ─frozen ViQ embedder (model.init_ckpt, decoder part)─▶ features ─trainable projector─▶ LLM ─▶ CE on answers

* Data: samples are read without touching image files (``check_files=False``); every image id must
  be in the store (checked up front: a ``StoreError`` lists the missing ids) and the store's FSQ
  levels must be the embedder's. Samples are packed greedily into rows of ``llm.max_length``
  positions; a micro-batch is ``data.micro_batch_size`` rows.
* Sharding: every epoch draws one permutation from (seed, epoch); rank r reads ``perm[r::world]``.
  Each rank plans its micro-batches from the samples' packed lengths (computed once at start, one
  code-store read per image) and every rank takes the same number (the fewest any rank has), so
  DDP never waits on a missing step.
* Optimizer: AdamW (``viq.train.optim.make_optimizer``: only parameters that require gradients, no
  decay on biases/norms), ``optim.schedule`` (``lr_factor``), grad accumulation (``optim.grad_accum``
  micro-batches per step) and clipping, mixed precision through accelerate (``make_accelerator``).
* Checkpoints (``viq.train.checkpoint``, atomic) every ``runtime.save_every`` steps and at the end:
  trainable tensors, optimizer, scheduler, data position, RNG of every rank. ``resume`` continues
  exactly (same losses on CPU).

Outputs under ``recipe.out_dir``: ``recipe.yaml``, ``checkpoints/``, ``model.safetensors`` (the
trained tensors: projector ``image_encoder.projector.*`` and ``llm.*`` LoRA or full-LLM weights, in
``PackedMLLM`` names), ``training.json``, ``tokenizer.json`` (word tokenizer of tiny runs) and
``metrics.json`` (final loss, and held-out caption-token accuracy on ``data.val_path`` when given).

Several processes go through accelerate's DDP wrapping (tested with two CPU processes on gloo:
disjoint samples at every step, one model written).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from viq.errors import ConfigError, WeightsError
from viq.train import checkpoint as ckpt
from viq.train.optim import make_optimizer, make_scheduler, total_steps
from viq.train.progress import MetricsWriter, ProgressEvent, ProgressFn, due

log = logging.getLogger("viq.train.offline")

TASK = "mllm_offline"


# ---- planning -----------------------------------------------------------------------------------


def group_rows(order: Sequence[int], lengths: Sequence[Optional[int]], length: int, rows: int) -> list[list[int]]:
    """Cut ``order`` into the sample groups ``packed_batches`` turns into one batch each.

    Mirrors its greedy packing: a sample that does not fit the row's space left starts the next row;
    ``rows`` rows make a batch; samples with no length (skipped) or longer than ``length`` are dropped.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    n_rows, used = 0, 0
    for pos in order:
        n = lengths[pos]
        if n is None or n > length:
            continue
        if used + n > length:
            n_rows += 1
            used = 0
            if n_rows == rows:
                groups.append(cur)
                cur, n_rows = [], 0
        cur.append(pos)
        used += n
    if cur:
        groups.append(cur)
    return groups


class EpochPlan:
    """This rank's micro-batches (lists of dataset positions) for each epoch; equal counts on all ranks."""

    def __init__(self, lengths: Sequence[Optional[int]], length: int, rows: int, world: int, rank: int, seed: int,
                 shuffle: bool = True):
        self.lengths, self.length, self.rows = list(lengths), length, rows
        self.world, self.rank, self.seed, self.shuffle = world, rank, seed, shuffle
        if self.steps(0) == 0:
            raise ConfigError(f"{sum(v is not None for v in self.lengths)} usable samples cannot fill one "
                              f"micro-batch on each of {world} process(es)")

    def _order(self, epoch: int) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _all(self, epoch: int) -> list[list[list[int]]]:
        order = self._order(epoch)
        return [group_rows(order[r::self.world], self.lengths, self.length, self.rows) for r in range(self.world)]

    def steps(self, epoch: int) -> int:
        return min(len(g) for g in self._all(epoch))

    def epoch(self, epoch: int) -> list[list[int]]:
        plans = self._all(epoch)
        n = min(len(g) for g in plans)
        return plans[self.rank][:n]


# ---- the entry point ------------------------------------------------------------------------------


def train_offline(recipe, progress: Optional[ProgressFn] = None, resume: Optional[bool] = None,
                  eval_limit: Optional[int] = None):
    from viq.data.conversations import WordTokenizer, load_samples
    from viq.mllm.collate import placeholder_id
    from viq.mllm.model import Projector, build_llm
    from viq.mllm.offline import (OfflineConversationDataset, OfflineImageEncoder, PackedMLLM, check_store_levels,
                                  expanded_length, packed_batches)
    from viq.store import CodeStore
    from viq.tokenizer import load_tokenizer
    from viq.train.run import TrainResult, frozen_tokenizer_dir, make_tokenizer, recipe_fingerprint, start_run
    from viq.weights.io import write_json, write_safetensors

    if recipe.llm is None:
        raise ConfigError("run.task mllm_offline needs an llm section")
    init = frozen_tokenizer_dir(recipe, "the viq weights directory the code store was encoded with (its decoder part embeds the codes)")
    acc, resume, out = start_run(recipe, resume)
    dev = acc.device
    seed = recipe.run.seed

    # frozen embedder + the store it made
    d = recipe.data
    tok_viq = load_tokenizer(init, parts=("decoder",), device=str(dev), dtype=torch.float32)
    embedder = tok_viq.model
    embedder.eval().requires_grad_(False)
    levels = list(tok_viq.levels)
    if recipe.head is not None and list(recipe.head.quantizer.levels) != levels:
        raise ConfigError(f"head.quantizer.levels {list(recipe.head.quantizer.levels)} differ from the embedder's "
                          f"{levels} ({init}); set them to the model's")
    store = CodeStore(Path(d.code_store).expanduser())
    check_store_levels(store, levels)

    # data and text tokenizer
    def read(path, what):
        s = load_samples(path, image_root=d.image_root, check_files=False)
        for bad in s.bad[:20]:
            log.warning("%s: skipping %s", what, bad)
        if s.bad_fraction > d.max_bad_fraction:
            raise ConfigError(f"{path}: {len(s.bad)} of {s.total} samples are bad ({s.bad_fraction:.1%} > "
                              f"data.max_bad_fraction {d.max_bad_fraction:.1%}); first: {s.bad[0]}")
        if not s.samples:
            raise ConfigError(f"{path}: no usable sample")
        return s

    train_set = read(d.path, "train")
    if d.sample_fraction is not None:
        train_set.samples = train_set.samples[: max(1, int(len(train_set.samples) * d.sample_fraction))]
    val_set = read(d.val_path, "val") if d.val_path else None
    text_tok = make_tokenizer(recipe, [s for s in (train_set, val_set) if s is not None],
                              [p for p in (out if resume else None,) if p is not None])
    if isinstance(text_tok, WordTokenizer) and acc.is_main_process:
        text_tok.save(out / ".tokenizer.json.tmp")
        os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")
    pad_id = getattr(text_tok, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(text_tok, "pad_token_id", None) or 0
    image_id = placeholder_id(text_tok)
    template = recipe.llm.template
    train_ds = OfflineConversationDataset(train_set.samples, store, text_tok, template, image_id, "train")
    train_ds.check()
    val_ds = None
    if val_set is not None:
        val_ds = OfflineConversationDataset(val_set.samples, store, text_tok, template, image_id, "val")
        val_ds.check()

    # model
    llm = build_llm(recipe.llm, vocab_size=len(text_tok), seed=seed + 5)
    hidden = llm.get_input_embeddings().embedding_dim
    with torch.no_grad():
        feat_dim = int(embedder.embed(torch.zeros(4, dtype=torch.long, device=dev)).shape[-1])
    p = recipe.llm.projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 6)
        projector = Projector(feat_dim, hidden, p.type, p.pool)
    projector.requires_grad_(p.trainable)
    model = PackedMLLM(llm, OfflineImageEncoder(embedder, projector)).to(dev)
    if recipe.runtime.gradient_checkpointing and hasattr(llm, "gradient_checkpointing_enable"):
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(llm, "enable_input_require_grads"):
            llm.enable_input_require_grads()
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: the projector and the LLM (LoRA) are all frozen")

    # plan
    L, R = recipe.llm.max_length, d.micro_batch_size
    tokens_fn = projector.num_tokens
    lengths: list[Optional[int]] = []
    for i in range(len(train_ds)):
        it = train_ds[i]
        lengths.append(None if not hasattr(it, "input_ids") else expanded_length(it, tokens_fn))
    too_long = [train_set.samples[i].index for i, n in enumerate(lengths) if n is not None and n > L]
    skipped: list[str] = [f"sample {i}: longer than llm.max_length {L} with its image spans" for i in too_long]
    plan = EpochPlan(lengths, L, R, acc.num_processes, acc.process_index, seed, d.shuffle)
    steps = total_steps(recipe.optim, plan.steps(0))

    o = recipe.optim
    opt = make_optimizer(model, o)
    sched = make_scheduler(opt, o.schedule, steps)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)

    def model_tensors() -> dict[str, torch.Tensor]:
        names = {n for n, q in raw.named_parameters() if q.requires_grad}
        return {k: v for k, v in raw.state_dict().items() if k in names}

    # position
    step, epoch, batch_pos = 0, 0, 0
    fingerprint = recipe_fingerprint(recipe)
    root = out / "checkpoints"
    resumed_from = None
    c = ckpt.open_for_resume(root, fingerprint, TASK) if resume else None
    if c is not None:
        last, st = c.path, c.state
        missing, unexpected = raw.load_state_dict(c.model, strict=False)
        absent = [k for k in model_tensors() if k not in c.model]
        if unexpected or absent:
            raise WeightsError(f"{last}: does not match this model (missing {absent[:3]}, unexpected "
                               f"{list(unexpected)[:3]})")
        opt.load_state_dict(c.optimizer_state())
        sched.load_state_dict(st["scheduler"])
        step, epoch, batch_pos = int(st["step"]), int(st["epoch"]), int(st["batch"])
        skipped = list(st.get("skipped", skipped))
        c.restore_rng(acc.process_index)
        resumed_from = last

    def emit(kind, metrics=None, message=""):
        if progress is not None and acc.is_main_process:
            progress(ProgressEvent(kind, step, steps, metrics or {}, [], message))

    def save() -> Path:
        def write(tmp):
            state = {"step": step, "epoch": epoch, "batch": batch_pos, "scheduler": sched.state_dict(),
                     "skipped": skipped[:100], "fingerprint": fingerprint, "task": TASK}
            ckpt.write_main(tmp, model_tensors(), opt.state_dict(), state)

        final = ckpt.save_step(acc, root, step, write, recipe.runtime.keep_last)
        emit("save", {"checkpoint": str(final)})
        return final

    def micro_batches():
        nonlocal epoch, batch_pos
        while True:
            groups = plan.epoch(epoch)
            while batch_pos < len(groups):
                group = groups[batch_pos]
                batch_pos += 1
                got = list(packed_batches(train_ds, group, L, tokens_fn, pad_id, rows=R))
                for b, skip in got:
                    skipped.extend(f"sample {s.index} (id {s.id}): {s.reason}" for s in skip)
                for b, _ in got:
                    yield b, group
            epoch += 1
            batch_pos = 0

    rt = recipe.runtime
    history: list[dict] = []
    last_ckpt = None
    writer = MetricsWriter(out / "tensorboard" if rt.tensorboard and acc.is_main_process else None)
    evals: dict = {}

    def run_eval(label: str) -> dict:
        raw.eval()
        metrics = evaluate(raw, val_ds, eval_limit, L, tokens_fn, pad_id, R, dev, acc)
        raw.train()
        writer.eval_done(label, metrics, step, acc.is_main_process)
        emit("eval", {"label": label, **metrics})
        return metrics

    t0 = time.time()
    model.train()
    emit("start", {"total_steps": steps})
    if acc.is_main_process:
        n_train = sum(q.numel() for q in raw.parameters() if q.requires_grad)
        log.info("%s offline MLLM: %d steps, %d trainable parameters, %d samples, rows of %d", recipe.run.name,
                 steps, n_train, len(train_ds), L)
    stream = micro_batches()
    while step < steps:
        t_step = time.time()
        loss_sum, n_tok, n_sup = 0.0, 0, 0
        indices: list[int] = []
        for micro in range(o.grad_accum):
            batch, group = next(stream)
            batch = batch.to(dev)
            indices += [train_set.samples[i].index for i in group]
            sync = micro == o.grad_accum - 1
            ctx = acc.no_sync(model) if (not sync and acc.num_processes > 1) else _null()
            with ctx:
                with acc.autocast():
                    res = model(batch)
                acc.backward(res.loss)  # accelerate divides by grad_accum
            loss_sum += float(res.loss.detach()) / o.grad_accum
            n_tok += batch.n_tokens  # positions fed to the LLM, padding included
            n_sup += res.n_supervised
        if o.grad_clip:
            acc.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], o.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = max(time.time() - t_step, 1e-9)
        rec = {"step": step, "loss": loss_sum, "lr": lr, "tokens": n_tok, "supervised": n_sup,
               "tokens_per_s": n_tok * acc.num_processes / dt}
        history.append(rec)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: non-finite loss {loss_sum}")
        if progress is not None:
            progress(ProgressEvent("step", step, steps, rec, indices, main=acc.is_main_process))
        if due(rt.log_every, step, steps):
            log.info("step %d/%d loss=%.4g lr=%.3g tokens/s=%.0f", step, steps, loss_sum, lr, rec["tokens_per_s"])
            writer.scalars("train", rec, step)
            emit("log", rec)
        if val_ds is not None and due(rt.eval_every, step, steps, at_end=False):
            evals[f"step-{step}"] = run_eval(f"step {step}")
        if due(rt.save_every, step, steps):
            last_ckpt = save()
    elapsed = time.time() - t0

    if val_ds is not None:
        evals["final"] = run_eval("final")
    writer.close()

    state_path = out / "model.safetensors"
    metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "task": TASK, "steps": step,
               "elapsed_s": round(elapsed, 2), "processes": acc.num_processes, "embedder": str(init),
               "code_store": str(store.root), "final_loss": history[-1]["loss"] if history else None,
               "train": history[-1] if history else None, "eval": evals.get("final", {}),
               "eval_during": {k: v for k, v in evals.items() if k != "final"}, "skipped": skipped[:100]}
    if acc.is_main_process:
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in model_tensors().items()}, state_path,
                          metadata={"format": "viq-mllm-offline"})
        write_json({"task": TASK, "stage": recipe.run.stage, "steps": step, "embedder": str(init),
                    "levels": levels, "vocab_size": len(text_tok), "projector": p.model_dump(mode="json"),
                    "lora": recipe.llm.lora.model_dump(mode="json"), "llm_trainable": recipe.llm.trainable,
                    "tokenizer": "tokenizer.json" if isinstance(text_tok, WordTokenizer) else
                    (recipe.llm.tokenizer or recipe.llm.name_or_path), "fingerprint": fingerprint},
                   out / "training.json")
        write_json(metrics, out / "metrics.json")
        log.info("done: %d steps in %.1fs; outputs in %s", step, elapsed, out)
    emit("end", {"steps": step})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(out, recipe.run.stage, step, metrics, out / "metrics.json", state_path, None, last_ckpt,
                       resumed_from, None, history, [str(b) for b in train_set.bad] + skipped)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def evaluate(model, ds, limit: Optional[int], length: int, tokens_fn, pad_id: int, rows: int, dev, acc) -> dict:
    """Held-out caption loss and token accuracy (argmax == label over the supervised tokens).

    Every process evaluates the same samples (the first ``limit``); cheap for held-out sets.
    """
    from viq.data.conversations import IGNORE_INDEX
    from viq.mllm.offline import VARLEN_SDPA, cu_seqlens, packed_batches

    n = len(ds) if limit is None else min(limit, len(ds))
    correct = total = 0
    loss_sum = 0.0
    for batch, _ in packed_batches(ds, list(range(n)), length, tokens_fn, pad_id, rows=rows):
        batch = batch.to(dev)
        with acc.autocast():
            embeds = model.embed(batch)
            kwargs, attn = {}, model._attn()
            if attn is not None and attn.startswith("flash_attention"):
                cu = cu_seqlens(batch.segments, embeds.device)
                m = max(batch.segments)
                kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
            elif attn == VARLEN_SDPA:
                kwargs = dict(cu_seq_lens_q=cu_seqlens(batch.segments, "cpu"))
            hidden = model.llm.get_decoder()(inputs_embeds=embeds, position_ids=batch.position_ids,
                                             use_cache=False, **kwargs).last_hidden_state
            target = batch.labels[:, 1:].masked_fill(batch.position_ids[:, 1:] == 0, IGNORE_INDEX)
            sel = target != IGNORE_INDEX
            if not bool(sel.any()):
                continue
            logits = model.llm.get_output_embeddings()(hidden[:, :-1][sel]).float()
        t = target[sel]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
        correct += int((logits.argmax(-1) == t).sum())
        total += int(t.numel())
    out = {"samples": n, "tokens": total}
    if total:
        out["token_accuracy"] = correct / total
        out["loss"] = loss_sum / total
    return out
