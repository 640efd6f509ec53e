"""Text from stored codes: a finished offline MLLM run (``run.task: mllm_offline``) captions a code store.

    run folder (recipe.yaml, training.json, model.safetensors, tokenizer.json) ─▶ frozen embedder +
    trained projector (+ LoRA) + LLM ─greedy─▶ one answer per stored image, for a prompt

So a user sees what the model learned. The run's own recipe rebuilds the model exactly as training
did (same seeds, same LoRA layout); its trained tensors are then loaded strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from viq.errors import ConfigError, WeightsError

DEFAULT_PROMPT = "Describe the image."


@dataclass
class OfflineRun:
    model: torch.nn.Module  # PackedMLLM: llm + OfflineImageEncoder(embedder, projector)
    mllm: torch.nn.Module  # an MLLM view of the same llm + projector (greedy generation)
    tokenizer: object
    template: str
    eos_id: Optional[int]
    levels: list
    image_id: int


def load_offline_run(run: Path, device: str = "cpu") -> OfflineRun:
    from viq.data.conversations import WordTokenizer
    from viq.mllm.collate import placeholder_id
    from viq.mllm.model import MLLM, Projector, build_llm
    from viq.mllm.offline import OfflineImageEncoder, PackedMLLM
    from viq.tokenizer import load_tokenizer
    from viq.train.recipe import load_recipe
    from viq.train.setup import eos_id
    from viq.weights.io import copy_named, read_tensors

    run = Path(run).expanduser()
    info_file = run / "training.json"
    if not info_file.is_file() or not (run / "model.safetensors").is_file():
        raise WeightsError(f"{run}: not a finished offline MLLM run (training.json and model.safetensors); train "
                           "one with `viqctl train --recipe recipes/mllm-offline.yaml`")
    info = json.loads(info_file.read_text())
    if info.get("task") != "mllm_offline":
        raise ConfigError(f"{run}: a {info.get('task', 'tokenizer')} run, not an offline MLLM run (run.task mllm_offline)")
    recipe = load_recipe(run / "recipe.yaml")
    if info.get("tokenizer") == "tokenizer.json":
        text_tok = WordTokenizer.load(run / "tokenizer.json")
    else:
        from transformers import AutoTokenizer

        text_tok = AutoTokenizer.from_pretrained(info["tokenizer"], local_files_only=True)
    embedder = load_tokenizer(info["embedder"], parts=("decoder",), device=device, dtype=torch.float32).model
    llm = build_llm(recipe.llm, vocab_size=len(text_tok), seed=recipe.run.seed + 5)
    hidden = llm.get_input_embeddings().embedding_dim
    with torch.no_grad():
        feat_dim = int(embedder.embed(torch.zeros(4, dtype=torch.long, device=device)).shape[-1])
    p = recipe.llm.projector
    projector = Projector(feat_dim, hidden, p.type, p.pool)
    model = PackedMLLM(llm, OfflineImageEncoder(embedder, projector)).to(device)
    copy_named(model.state_dict(), read_tensors(run / "model.safetensors"), str(run / "model.safetensors"),
               " (its recipe does not build it)")
    model.eval()
    mllm = MLLM(llm, projector, recipe.llm.max_length).eval()
    return OfflineRun(model, mllm, text_tok, recipe.llm.template, eos_id(text_tok, recipe.llm.template),
                      list(info.get("levels") or []), placeholder_id(text_tok))


def prompt_ids(run: OfflineRun, prompt: str) -> tuple[list[int], list[int]]:
    """(ids up to the assistant's answer, image positions) for one image and ``prompt``."""
    from viq.data.conversations import IGNORE_INDEX, IMAGE_TOKEN, Turn, encode_conversation

    enc = encode_conversation([Turn("human", f"{IMAGE_TOKEN}\n{prompt}"), Turn("gpt", "x")], run.tokenizer,
                              run.template, run.image_id)
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    return enc.input_ids[:first], [p for p in enc.image_positions if p < first]


def decode_text(tokenizer, ids: list[int]) -> str:
    """Token ids -> text without special tokens (the keyword differs between tokenizer kinds)."""
    try:
        return tokenizer.decode(ids, skip_specials=True)
    except TypeError:
        return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def caption_store(store_dir, run: OfflineRun, prompt: str = DEFAULT_PROMPT, ids: Optional[Sequence[str]] = None,
                  limit: Optional[int] = None, max_new_tokens: int = 32) -> Iterator[tuple[str, str]]:
    """(image id, generated text) for each stored image (all, ``ids``, or the first ``limit``)."""
    from viq.mllm.offline import check_store_levels
    from viq.store import CodeStore

    store = CodeStore(Path(store_dir).expanduser())
    if run.levels:
        check_store_levels(store, run.levels)
    keys = list(ids) if ids else store.ids()
    if limit is not None:
        keys = keys[:limit]
    prompt_tokens, positions = prompt_ids(run, prompt)
    device = next(run.model.parameters()).device
    for key in keys:
        rec = store.get(key)
        codes = torch.from_numpy(rec.codes).to(device)
        feats, _ = run.model.image_encoder([codes])
        out = run.mllm.generate(prompt_tokens, positions, feats, max_new_tokens, run.eos_id)
        yield key, decode_text(run.tokenizer, out).strip()
