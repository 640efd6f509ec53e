"""The two setups' inputs and models: packed rows written and read back through the real offline
path, and random-weight Qwen2.5 LLMs built from their published configurations."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from viq.bench.config import qwen2_config
from viq.errors import ConfigError


WORDS = [f"w{i}" for i in range(512)]


@dataclass
class SeqLayout:
    """How one packed sequence is filled: n single-image samples whose text fills the rest exactly."""

    seq_len: int
    n_images: int
    image_size: tuple[int, int]
    grid: tuple[int, int]
    image_tokens: int  # LLM positions per image
    vit_tokens: int  # ViT patches per image
    text_per_sample: list[int]  # prompt + answer words per sample


def plan_layout(seq_len: int, image_size: tuple[int, int], image_tokens: Callable[[tuple[int, int]], int],
                overhead: int, n_images: Optional[int] = None, patch: int = 16) -> SeqLayout:
    """``overhead``: template tokens of a sample besides its words and its image span."""
    w, h = image_size
    grid = (math.ceil(h / patch), math.ceil(w / patch))
    t = image_tokens(grid)
    if n_images is None:  # auto: about 40 % of the positions are image tokens
        n_images = max(1, round(0.4 * seq_len / t))
    budget = seq_len - n_images * (t + overhead)
    if budget < 2 * n_images:
        raise ConfigError(f"{n_images} image(s) of {w}x{h} ({t} LLM tokens each) do not fit a {seq_len}-token "
                          "sequence with their prompts and answers; use fewer images, smaller images or a longer --seq")
    per = [budget // n_images] * n_images
    per[-1] += budget - sum(per)
    return SeqLayout(seq_len, n_images, (w, h), grid, t, grid[0] * grid[1], per)


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def write_bench_data(root: Path, layout: SeqLayout, rows: int, levels: list[int], seed: int = 0):
    """A conversation JSONL and a code store of random codes for ``rows`` sequences of ``layout``.

    Returns (data file, store dir). Each sample: one image, a prompt and an answer (1:3 words).
    """
    from viq.store import CodeStoreWriter, finalize_store

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codebook = int(np.prod(levels))
    store = root / "codes"
    w, h = layout.image_size
    info = {"name": "bench-random", "fingerprint": "bench-random", "levels": list(levels), "codebook_size": codebook}
    lines = []
    with CodeStoreWriter(store, info, preprocess=f"bench:{w}x{h}") as writer:
        for r in range(rows):
            for k, n_words in enumerate(layout.text_per_sample):
                key = f"img-{r:04d}-{k:03d}.png"
                codes = rng.integers(0, codebook, (layout.grid[0], layout.grid[1], 4))
                writer.add(key, key, hashlib.sha256(key.encode()).hexdigest(), w, h, codes)
                answer = max(1, round(0.75 * n_words))
                prompt = n_words - answer
                lines.append(json.dumps({"id": f"s-{r:04d}-{k:03d}", "image": [{"img_path": key}], "conversations": [
                    {"from": "human", "value": "<image>\n" + _words(rng, prompt)},
                    {"from": "gpt", "value": _words(rng, answer)}]}))
    finalize_store(store)
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, store


def template_overhead(tokenizer, template: str = "plain") -> int:
    """Tokens a one-image sample takes besides its words (the placeholder not counted)."""
    from viq.data.conversations import Turn, encode_conversation

    enc = encode_conversation([Turn("human", "<image>\nw0"), Turn("gpt", "w1")], tokenizer, template)
    return len(enc.input_ids) - 1 - 2


def bench_tokenizer():
    from viq.data.conversations import WordTokenizer

    return WordTokenizer(list(WordTokenizer.DEFAULT_SPECIALS) + WORDS)


def build_batches(root: Path, layout: SeqLayout, rows: int, levels: list[int], image_tokens, seed: int = 0):
    """Write the data, read it back through the offline path, pack it: (offline rows, report)."""
    from viq.data.conversations import load_samples
    from viq.mllm.offline import OfflineConversationDataset, pack_items
    from viq.store import CodeStore

    data, store = write_bench_data(root, layout, rows, levels, seed)
    tok = bench_tokenizer()
    samples = load_samples(data, check_files=False)
    if samples.bad:
        raise ConfigError(f"bench data: {samples.bad[0]}")  # a bug, not a user error
    ds = OfflineConversationDataset(samples.samples, CodeStore(store), tok, "plain")
    ds.check()
    t0 = time.perf_counter()
    items = [ds[i] for i in range(len(ds))]
    read_s = time.perf_counter() - t0
    packed, skipped = pack_items(items, layout.seq_len, image_tokens, pad_id=tok.pad_id)
    if skipped or len(packed) != rows:
        raise ConfigError(f"bench packing made {len(packed)} rows for {rows} ({len(skipped)} skipped)")
    return packed, {"store_read_s_per_image": read_s / max(1, rows * layout.n_images)}


def build_llm(name: str, device: str, dtype: torch.dtype, attn: str, max_positions: int, seed: int = 0,
              llm_train: str = "full", grad_checkpointing: bool = True) -> nn.Module:
    """A random-weight Qwen2.5 of size ``name``, built directly on ``device``."""
    from transformers import Qwen2ForCausalLM

    if attn == "varlen_sdpa":
        from viq.mllm.varlen_attention import register_varlen_sdpa

        attn = register_varlen_sdpa()
    cfg = qwen2_config(name, max_positions, attn)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM._from_config(cfg, dtype=dtype, attn_implementation=attn)
    llm.config.use_cache = False
    if llm_train == "full":
        llm.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        llm.requires_grad_(False)
        lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                          use_dora=llm_train == "dora",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        llm = get_peft_model(llm, lora).to(dtype)
    if grad_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return llm.train()


def n_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def step(model, batch, opt, train: bool):
    if not train:
        with torch.no_grad():
            return model(batch)
    opt.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    opt.step()
    return out
