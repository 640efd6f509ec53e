"""The LLaVA-style MLLM the tokenizer is trained inside: Qwen2 + a projector + optional LoRA/DoRA.

Image features are projected and spliced into the token sequence at each image placeholder through
``inputs_embeds`` (reference-training.md §2.2); the loss is the cross-entropy on answer tokens only,
computed on the supervised positions alone (full-vocabulary logits for 4k positions would not fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.data.conversations import IGNORE_INDEX
from viq.errors import ConfigError, WeightsError
from viq.nn.layers import Mlp


# ---- projector --------------------------------------------------------------------------------


class RegionalPool(nn.Module):
    """2x2 pooling with learned per-channel weights (the reference's NormalizedDwPooler, 2x mode).

    Each of the 4 tokens of a window, concatenated with the window mean, gives per-channel scores;
    a softmax over the 4 positions weights their sum.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = Mlp(2 * dim, dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (h, w, H) with even h, w -> (h/2, w/2, H)."""
        h, w, c = x.shape
        win = x.reshape(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(h // 2, w // 2, 4, c)
        mean = win.mean(dim=2, keepdim=True).expand_as(win)
        weights = self.score(torch.cat((win, mean), dim=-1)).softmax(dim=2)
        return (weights * win).sum(dim=2)


class Projector(nn.Module):
    """ViT/head features (N, C) of one image with grid (h, w) -> LLM embeddings (L, H).

    ``oryx_mlp_v2``: Linear C->H, optional 2x2 regional pooling, GELU, Linear H->H, then a learned
    newline vector after every row and begin/end vectors around the image: L = h'(w'+1) + 2.
    ``mlp``: Linear, GELU, Linear after an optional 2x2 mean pooling: L = h' w'.
    Grids with an odd side are edge-padded to even before 2x pooling (the reference crashed there).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "oryx_mlp_v2", pool: str = "2x"):
        super().__init__()
        if kind not in ("oryx_mlp_v2", "mlp") or pool not in ("1x", "2x"):
            raise ConfigError(f"unknown projector {kind!r} / pool {pool!r}")
        self.kind, self.factor = kind, 2 if pool == "2x" else 1
        self.proj1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(out_dim, out_dim)
        if kind == "oryx_mlp_v2":
            self.pool = RegionalPool(out_dim) if self.factor == 2 else None
            std = out_dim ** -0.5
            self.image_newline = nn.Parameter(torch.randn(out_dim) * std)
            self.image_begin = nn.Parameter(torch.randn(out_dim) * std)
            self.image_end = nn.Parameter(torch.randn(out_dim) * std)

    def pooled_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        h, w = grid
        f = self.factor
        return (h + f - 1) // f, (w + f - 1) // f

    def num_tokens(self, grid: tuple[int, int]) -> int:
        h, w = self.pooled_grid(grid)
        return h * (w + 1) + 2 if self.kind == "oryx_mlp_v2" else h * w

    def _even(self, x: torch.Tensor) -> torch.Tensor:
        h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x.permute(2, 0, 1)[None], (0, w % 2, 0, h % 2), mode="replicate")[0].permute(1, 2, 0)
        return x

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        if self.kind == "mlp":
            x = features.reshape(h, w, -1)
            if self.factor == 2:
                x = self._even(x)
                x = F.avg_pool2d(x.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
            return self.proj2(self.act(self.proj1(x))).reshape(-1, self.proj2.out_features)
        x = self.proj1(features).reshape(h, w, -1)
        if self.pool is not None:
            x = self.pool(self._even(x))
        x = self.proj2(self.act(x))
        hh, ww, c = x.shape
        x = torch.cat((x, self.image_newline.to(x.dtype).expand(hh, 1, c)), dim=1).reshape(-1, c)
        return torch.cat((self.image_begin.to(x.dtype)[None], x, self.image_end.to(x.dtype)[None]))


# ---- language model ---------------------------------------------------------------------------


def build_llm(section, vocab_size: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
              attn_implementation: Optional[str] = None) -> nn.Module:
    """A Qwen2 causal LM: from ``section.name_or_path`` (local) or a tiny config built in code.

    ``section`` is the recipe's ``llm`` section. LoRA/DoRA is applied when ``section.lora.enabled``;
    otherwise the whole LLM trains iff ``section.trainable``.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if section.tiny is not None:
        if not vocab_size:
            raise ConfigError("a tiny LLM needs the vocabulary size of its tokenizer")
        cfg = Qwen2Config(**section.tiny.qwen2_kwargs(vocab_size, section.max_length))
        cfg._attn_implementation = attn_implementation or "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = Qwen2ForCausalLM(cfg).to(dtype)
    else:
        try:
            llm = AutoModelForCausalLM.from_pretrained(section.name_or_path, dtype=dtype, local_files_only=True,
                                                       attn_implementation=attn_implementation or "sdpa")
        except (OSError, ValueError) as exc:
            raise WeightsError(f"llm.name_or_path {section.name_or_path}: cannot load a causal LM from local files "
                               f"({exc}); download it first (viqctl download)") from None
        if vocab_size is not None and vocab_size > llm.get_input_embeddings().num_embeddings:
            raise ConfigError(f"the tokenizer has {vocab_size} ids but the LLM only {llm.get_input_embeddings().num_embeddings} "
                              "embedding rows")
    llm.config.use_cache = False
    llm.requires_grad_(bool(section.trainable))
    if section.lora.enabled:
        llm = apply_lora(llm, section.lora)
    return llm


def apply_lora(llm: nn.Module, lora) -> nn.Module:
    """peft LoRA (DoRA when ``lora.dora``) on ``lora.targets``; peft freezes everything else."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                     use_dora=lora.dora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, cfg)


@dataclass
class LMOutput:
    loss: torch.Tensor  # mean cross-entropy over the supervised tokens of the batch
    n_supervised: int
    n_correct: torch.Tensor  # argmax == label among supervised tokens (detached)
    n_tokens: int  # sequence tokens fed to the LLM (images included, padding excluded)


class MLLM(nn.Module):
    def __init__(self, llm: nn.Module, projector: Projector, max_length: int = 4096):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    def project(self, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image (N_i, C) features -> (L_i, H) LLM embeddings."""
        return [self.projector(f, g) for f, g in zip(features, grids)]

    def splice(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
               image_positions: Sequence[Sequence[int]], image_embeds: Sequence[torch.Tensor]):
        """Token ids with one placeholder per image -> (embeds (B, L, H), attention mask, labels).

        Images are consumed in order across the batch; every image span gets IGNORE_INDEX labels.
        Sequences longer than max_length are cut at the end (the data set drops samples whose
        image spans would not fit, so an image is never cut). Right padding, zero embeddings.
        """
        emb = self.llm.get_input_embeddings()
        device = emb.weight.device
        seqs, labs = [], []
        k = 0
        for ids, lab, pos in zip(input_ids, labels, image_positions):
            ids_t = torch.tensor(ids, dtype=torch.long, device=device)
            lab_t = torch.tensor(lab, dtype=torch.long, device=device)
            pieces, plabels, start = [], [], 0
            for p in list(pos) + [len(ids)]:
                if p > start:
                    pieces.append(emb(ids_t[start:p]))
                    plabels.append(lab_t[start:p])
                if p < len(ids):
                    img = image_embeds[k].to(emb.weight.dtype)
                    k += 1
                    pieces.append(img)
                    plabels.append(torch.full((img.shape[0],), IGNORE_INDEX, dtype=torch.long, device=device))
                start = p + 1
            seqs.append(torch.cat(pieces)[: self.max_length])
            labs.append(torch.cat(plabels)[: self.max_length])
        if k != len(image_embeds):
            raise ValueError(f"{len(image_embeds)} images for {k} placeholders")
        length = max(s.shape[0] for s in seqs)
        dtype = seqs[0].dtype
        embeds = torch.zeros(len(seqs), length, seqs[0].shape[1], dtype=dtype, device=device)
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
        out_labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            embeds[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            out_labels[i, : s.shape[0]] = lab
        return embeds, mask, out_labels

    def hidden_states(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def forward(self, input_ids, labels, image_positions, image_embeds) -> LMOutput:
        embeds, mask, lab = self.splice(input_ids, labels, image_positions, image_embeds)
        hidden = self.hidden_states(embeds, mask)
        target = lab[:, 1:]
        sel = target != IGNORE_INDEX
        n = int(sel.sum())
        if n == 0:  # keep the graph connected; contributes nothing
            zero = hidden[:, :1].sum() * 0.0
            return LMOutput(zero, 0, zero.detach(), int(mask.sum()))
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][sel]).float()
        loss = F.cross_entropy(logits, target[sel])
        correct = (logits.detach().argmax(-1) == target[sel]).sum()
        return LMOutput(loss, n, correct, int(mask.sum()))

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], image_positions: Sequence[int], image_embeds: Sequence[torch.Tensor],
                 max_new_tokens: int = 32, eos_id: Optional[int] = None) -> list[int]:
        """Greedy continuation of one prompt (recomputed each step; evaluation only)."""
        emb = self.llm.get_input_embeddings()
        embeds, mask, _ = self.splice([list(prompt_ids)], [[IGNORE_INDEX] * len(prompt_ids)], [list(image_positions)],
                                      image_embeds)
        out: list[int] = []
        for _ in range(max_new_tokens):
            if embeds.shape[1] >= self.max_length:
                break
            hidden = self.hidden_states(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))
            nxt = int(self.llm.get_output_embeddings()(hidden[0, -1]).argmax())
            if eos_id is not None and nxt == eos_id:
                break
            out.append(nxt)
            step = emb(torch.tensor([nxt], device=embeds.device)).to(embeds.dtype)
            embeds = torch.cat((embeds, step[None]), dim=1)
        return out
