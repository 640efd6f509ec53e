"""The offline MLLM stage (``run.task: mllm_offline``): LLM + projector (+ LoRA) trained on a code store.

    conversations (data.path) ─encode_conversation─▶ ids/labels ─┐
    img_path ─CodeStore (data.code_store, made by `viqctl encode`)─▶ codes ─┤ packed rows (viq.mllm.offline)
    codes ─frozen ViQ embedder (init.ckpt, decoder part)─▶ features ─trainable projector─▶ LLM ─▶ CE on answers

* Data: samples are read without touching image files; every image id must be in the store
  (checked up front: a ``StoreError`` lists the missing ids) and the store's FSQ levels must be the
  embedder's. Samples are packed greedily into rows of ``llm.max_length`` positions; a micro-batch
  is ``data.micro_batch_size`` rows.
* Attention (``llm.attention``): flash_attention_2 with the packed boundaries, or SDPA per packed
  sample (``varlen_sdpa``: no cross-row or cross-sample work), or transformers' SDPA over the whole
  packed sequence with a block-diagonal mask (``sdpa``). ``auto``: the first available of the two
  fast ones. ``benchmarks/offline_attention.py`` measures them against each other.
* Sharding: every epoch draws one permutation from (seed, epoch); rank r reads ``perm[r::world]``.
  Each rank plans its micro-batches from the samples' packed lengths and every rank takes the same
  number (the fewest any rank has), so DDP never waits on a missing step.
* Chaining: ``llm.init_from`` names an earlier offline run (LLaVA pretrain -> finetune): its
  projector and LoRA (or LLM) tensors are the starting point.

Outputs under ``recipe.out_dir``: ``model.safetensors`` (the trained tensors in ``PackedMLLM``
names), ``training.json``, ``tokenizer.json`` (word tokenizer of tiny runs) and ``metrics.json``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from viq.errors import ConfigError, WeightsError
from viq.train.optim import total_steps
from viq.train.setup import check_architecture, frozen_tokenizer_dir, make_tokenizer, read_data, recipe_fingerprint
from viq.train.stage import DataPosition, Export, Stage, StepOutput

log = logging.getLogger("viq.train.offline")

TASK = "mllm_offline"


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


def attention_for(choice: str, device) -> str:
    """The ``attn_implementation`` for ``llm.attention`` (auto: the fastest one available here)."""
    from viq.mllm.varlen_attention import register_varlen_sdpa

    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        choice = "flash_attention_2" if flash else "varlen_sdpa"
    if choice == "flash_attention_2" and not flash:
        raise ConfigError("llm.attention flash_attention_2 needs a GPU and the flash-attn package; use auto or "
                          "varlen_sdpa")
    return register_varlen_sdpa() if choice == "varlen_sdpa" else choice


class OfflineStage(Stage):
    task = TASK

    @staticmethod
    def check(recipe) -> None:
        if recipe.llm is None:
            raise ConfigError("run.task mllm_offline needs an llm section")
        frozen_tokenizer_dir(recipe, "the viq weights directory the code store was encoded with (its decoder "
                                     "part embeds the codes)")

    def __init__(self, recipe, acc, out: Path, resume: bool, eval_limit: Optional[int]):
        from viq.data.conversations import WordTokenizer
        from viq.mllm.collate import placeholder_id
        from viq.mllm.model import Projector, build_llm
        from viq.mllm.offline import (OfflineConversationDataset, OfflineImageEncoder, PackedMLLM, check_store_levels,
                                      expanded_length)
        from viq.store import CodeStore
        from viq.tokenizer import load_tokenizer

        self.recipe, self.acc, self.out, self.eval_limit = recipe, acc, out, eval_limit
        self.init = init = frozen_tokenizer_dir(recipe, "the viq weights directory of the code store")
        dev, seed, d, llm_cfg = acc.device, recipe.run.seed, recipe.data, recipe.llm
        tok_viq = load_tokenizer(init, parts=("decoder",), device=str(dev), dtype=torch.float32)
        check_architecture(recipe, tok_viq.config, init)
        embedder = tok_viq.model
        embedder.eval().requires_grad_(False)
        self.levels = levels = list(tok_viq.levels)
        self.store = store = CodeStore(Path(d.code_store).expanduser())
        check_store_levels(store, levels)

        # image files are not read: the store holds the codes
        self.train_set = read_data(d.path, d.image_root, d.sample_fraction, d.max_bad_fraction, "train", recipe,
                                   check_files=False)
        val_set = read_data(d.val_path, d.image_root, None, d.max_bad_fraction, "val", recipe, check_files=False) \
            if d.val_path else None
        self.text_tok = text_tok = make_tokenizer(recipe, [s for s in (self.train_set, val_set) if s is not None],
                                                  [out] if resume else [])
        self.word_tokenizer = isinstance(text_tok, WordTokenizer)
        if self.word_tokenizer and acc.is_main_process:
            text_tok.save(out / ".tokenizer.json.tmp")
            os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")
        pad_id = getattr(text_tok, "pad_id", None)
        self.pad_id = pad_id if pad_id is not None else (getattr(text_tok, "pad_token_id", None) or 0)
        image_id = placeholder_id(text_tok)
        self.train_ds = OfflineConversationDataset(self.train_set.samples, store, text_tok, llm_cfg.template, image_id,
                                                   "train")
        self.train_ds.check()
        self.val_ds = None
        if val_set is not None:
            self.val_ds = OfflineConversationDataset(val_set.samples, store, text_tok, llm_cfg.template, image_id, "val")
            self.val_ds.check()
        self.has_eval = self.val_ds is not None

        self.attention = attention_for(llm_cfg.attention, dev)
        llm = build_llm(llm_cfg, vocab_size=len(text_tok), seed=seed + 5, attn_implementation=self.attention)
        hidden = llm.get_input_embeddings().embedding_dim
        with torch.no_grad():
            feat_dim = int(embedder.embed(torch.zeros(4, dtype=torch.long, device=dev)).shape[-1])
        p = llm_cfg.projector
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 6)
            projector = Projector(feat_dim, hidden, p.type, p.pool)
        projector.requires_grad_(p.trainable)
        self.model = PackedMLLM(llm, OfflineImageEncoder(embedder, projector)).to(dev)
        if recipe.runtime.gradient_checkpointing and hasattr(llm, "gradient_checkpointing_enable"):
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(llm, "enable_input_require_grads"):
                llm.enable_input_require_grads()
        if not any(q.requires_grad for q in self.model.parameters()):
            raise ConfigError("nothing to train: the projector and the LLM (LoRA) are all frozen")
        if llm_cfg.init_from:
            self._init_from(Path(llm_cfg.init_from).expanduser())

        self.L, self.R = llm_cfg.max_length, d.micro_batch_size
        self.tokens_fn = projector.num_tokens
        lengths: list[Optional[int]] = []
        for i in range(len(self.train_ds)):
            it = self.train_ds[i]
            lengths.append(None if not hasattr(it, "input_ids") else expanded_length(it, self.tokens_fn))
        self.too_long = [f"sample {self.train_set.samples[i].index}: longer than llm.max_length {self.L} with its "
                         "image spans" for i, n in enumerate(lengths) if n is not None and n > self.L]
        self.plan = EpochPlan(lengths, self.L, self.R, acc.num_processes, acc.process_index, seed, d.shuffle)
        self.steps = total_steps(recipe.optim, self.plan.steps(0))
        if acc.is_main_process:
            n_train = sum(q.numel() for q in self.model.parameters() if q.requires_grad)
            log.info("%s offline MLLM: %d steps, %d trainable parameters, %d samples, rows of %d, attention %s",
                     recipe.run.name, self.steps, n_train, len(self.train_ds), self.L, self.attention)

    def _init_from(self, run: Path) -> None:
        """Projector / LoRA / LLM tensors from an earlier offline run, by name; a shape change is an error."""
        from viq.weights.io import copy_named, read_tensors

        f = run / "model.safetensors" if run.is_dir() else run
        if not f.is_file():
            raise WeightsError(f"llm.init_from {run}: no model.safetensors (train that offline run first)")
        tensors = read_tensors(f)
        wanted = self.state_tensors()
        copy_named(self.model.state_dict(), tensors, f"llm.init_from {f}",
                   " (a different LLM, projector or LoRA setting)")
        log.info("llm.init_from %s: %d tensors loaded (%d trained here start fresh)", f, len(tensors),
                 len([k for k in wanted if k not in tensors]))

    def total_steps(self) -> int:
        return self.steps

    def micro_batches(self, pos: DataPosition, skips):
        from viq.mllm.offline import packed_batches

        epoch, b = pos.epoch, pos.batch
        while True:
            groups = self.plan.epoch(epoch)
            while b < len(groups):
                group = groups[b]
                b += 1
                for batch, skipped in packed_batches(self.train_ds, group, self.L, self.tokens_fn, self.pad_id,
                                                     rows=self.R):
                    for s in skipped:
                        skips.note(s.index, f"sample {s.index} (id {s.id}): {s.reason}")
                    batch.sample_indices = [self.train_set.samples[i].index for i in group]
                    yield batch, DataPosition(epoch, b)
            epoch, b = epoch + 1, 0

    def to_device(self, batch, device):
        moved = batch.to(device)
        moved.sample_indices = batch.sample_indices
        return moved

    def loss(self, model, batch, step: int) -> StepOutput:
        res = model(batch)
        return StepOutput(res.loss, {}, {"tokens": batch.n_tokens, "supervised": res.n_supervised},
                          list(getattr(batch, "sample_indices", [])))

    def eval_size(self) -> int:
        n = len(self.val_ds)
        return n if self.eval_limit is None else min(self.eval_limit, n)

    def evaluate(self, model, tick) -> dict:
        model.eval()
        try:
            return evaluate(model, self.val_ds, self.eval_size(), self.L, self.tokens_fn, self.pad_id, self.R,
                            self.acc, tick)
        finally:
            model.train()

    def export(self, result) -> Export:
        from viq.weights.io import write_json, write_safetensors

        recipe, acc, out, history, evals = self.recipe, self.acc, self.out, result.history, result.evals
        metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "task": TASK, "steps": result.steps,
                   "elapsed_s": round(result.elapsed_s, 2), "processes": acc.num_processes, "embedder": str(self.init),
                   "code_store": str(self.store.root), "attention": self.attention,
                   "final_loss": history[-1]["loss"] if history else None, "train": history[-1] if history else None,
                   "eval": evals.get("final", {}), "eval_during": {k: v for k, v in evals.items() if k != "final"},
                   "skipped": (self.too_long + result.skipped)[:100]}
        state_path = out / "model.safetensors"
        if acc.is_main_process:
            llm_cfg = recipe.llm
            write_safetensors({k: v.cpu().contiguous() for k, v in self.state_tensors().items()}, state_path,
                              metadata={"format": "viq-mllm-offline"})
            write_json({"task": TASK, "stage": recipe.run.stage, "steps": result.steps, "embedder": str(self.init),
                        "levels": self.levels, "vocab_size": len(self.text_tok),
                        "projector": llm_cfg.projector.model_dump(mode="json"),
                        "lora": llm_cfg.lora.model_dump(mode="json"), "llm_trainable": llm_cfg.trainable,
                        "llm": llm_cfg.model_dump(mode="json"), "template": llm_cfg.template,
                        "tokenizer": "tokenizer.json" if self.word_tokenizer else
                        (llm_cfg.tokenizer or llm_cfg.name_or_path), "fingerprint": recipe_fingerprint(recipe)},
                       out / "training.json")
            write_json(metrics, out / "metrics.json")
        return Export(metrics, state_path, None)

    def skipped_in_file(self) -> list[str]:
        return [str(b) for b in self.train_set.bad] + self.too_long


@torch.no_grad()
def evaluate(model, ds, n: int, length: int, tokens_fn, pad_id: int, rows: int, acc, tick=None) -> dict:
    """Held-out caption loss and token accuracy (argmax == label over the supervised tokens).

    Every process evaluates the same samples (the first ``n``); cheap for held-out sets.
    """
    from viq.mllm.offline import packed_batches

    correct = total = done = 0
    loss_sum = 0.0
    for batch, _ in packed_batches(ds, list(range(n)), length, tokens_fn, pad_id, rows=rows):
        batch = batch.to(acc.device)
        done += int((batch.position_ids == 0).sum())  # sample starts (and padding runs): near enough
        if tick is not None:
            tick(min(done, n), n)
        with acc.autocast():
            logits, t = model.supervised(batch, model.hidden(batch, model.embed(batch)))
        if t.numel() == 0:
            continue
        loss_sum += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
        correct += int((logits.argmax(-1) == t).sum())
        total += int(t.numel())
    out = {"samples": n, "tokens": total}
    if total:
        out["token_accuracy"] = correct / total
        out["loss"] = loss_sum / total
    return out
