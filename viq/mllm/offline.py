"""MLLM training on offline codes: conversations whose images are rows of a code store.

The data's way through (the paper's offline setup)::

    conversation JSON/JSONL ──encode_conversation──▶ ids, labels (answers only), one placeholder per image
    img_path ──CodeStore.get──▶ codes (h, w, 4)                  (made once by `viqctl encode`)
    samples ──pack_items──▶ rows of exactly `length` tokens: samples back to back, image spans expanded,
                            position_ids restarting at 0 per sample, padding at the end
    codes ──OfflineImageEncoder: frozen ViQ embedder (decoder part) → trainable projector──▶ LLM embeddings
    rows + embeddings ──PackedMLLM: masked_scatter into inputs_embeds──▶ Qwen2 ──▶ CE on answers

``OnlineImageEncoder`` is the LLaVA-style counterpart (pixels → continuous SigLIP2 ViT → projector)
that reads the very same packed rows; ``viq.bench`` times the two against each other.

Packed rows go to the LLM as ONE sequence of batch size 1 with ``position_ids`` restarting at 0:
transformers (>= 5) then keeps samples apart by itself (a block-diagonal causal mask for SDPA,
varlen kernels for flash-attention, for which we also pass the cu_seqlens so no layer syncs).
``VARLEN_SDPA`` (``register_varlen_sdpa()``) runs SDPA per sample instead of over a masked L x L
square: the same cost shape as flash varlen, on CPUs and GPUs without flash-attn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from viq.data.conversations import IGNORE_INDEX, Sample, TextTokenizer, encode_conversation
from viq.errors import ConfigError, StoreError
from viq.mllm.collate import Skipped
from viq.mllm.model import Projector
from viq.mllm.varlen_attention import VARLEN_SDPA, cu_seqlens
from viq.nn.vit import AnyResViT
from viq.store import CodeStore

#: grid (h, w) -> LLM positions one image takes (``Projector.num_tokens``).
TokensFn = Callable[[tuple[int, int]], int]


# ---- the offline data set ---------------------------------------------------------------------


@dataclass
class OfflineItem:
    """One conversation ready for packing: token ids with one placeholder per image, and its codes."""

    index: int  # the sample's index in its data file
    id: Optional[str]
    image_keys: list[str]  # the code-store id of each image, in order
    codes: list[torch.Tensor]  # (h, w, 4) int64 per image
    input_ids: list[int]
    labels: list[int]
    image_positions: list[int]
    source: str = ""

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [(int(c.shape[0]), int(c.shape[1])) for c in self.codes]


def store_key(ref) -> str:
    """The code-store id of an image entry: its ``img_path`` as written (``path@offset`` for packed files).

    ``viqctl encode FOLDER`` names images by their POSIX path relative to FOLDER, so encoding the
    data's image root makes these ids match.
    """
    if getattr(ref, "offset", None) is not None:
        return f"{ref.source}@{ref.offset}"
    return ref.source


def check_store_levels(store: CodeStore, levels: Sequence[int]) -> None:
    """The store's codes must come from a quantizer with these FSQ levels, else the embedder misreads them."""
    have = (store.manifest.get("model") or {}).get("levels")
    if have is not None and list(have) != list(levels):
        raise StoreError(f"the code store {store.root} holds codes of FSQ levels {list(have)} but the embedder uses "
                         f"{list(levels)}; embed with the model that encoded the store, or encode again")


class OfflineConversationDataset(torch.utils.data.Dataset):
    """Samples whose images are looked up by id in a code store -> ``OfflineItem`` or ``Skipped``.

    No image is ever decoded: a sample costs one Parquet row-group read per image. A sample whose
    image id is not in the store comes back as ``Skipped`` naming the id; ``check()`` lists every
    missing id up front (cheap: the store's id index only) and raises when ``strict``.
    """

    def __init__(self, samples: Sequence[Sample], store: Union[CodeStore, str, Path], tokenizer: TextTokenizer,
                 template: str = "plain", image_token_id: Optional[int] = None, name: str = "train"):
        self.samples = list(samples)
        self.store = store if isinstance(store, CodeStore) else CodeStore(store)
        self.tokenizer, self.template = tokenizer, template
        self.image_token_id = image_token_id
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def _lookup(self, ref) -> Optional[str]:
        key = store_key(ref)
        if key in self.store:
            return key
        norm = PurePosixPath(key).as_posix()  # "./a.png" was encoded as "a.png"
        return norm if norm in self.store else None

    def missing(self) -> list[tuple[int, Optional[str], str]]:
        """(sample index, sample id, image id) of every image the store lacks."""
        return [(s.index, s.id, store_key(r)) for s in self.samples for r in s.images if self._lookup(r) is None]

    def check(self, strict: bool = True) -> list[tuple[int, Optional[str], str]]:
        """Every missing image id; with ``strict`` a StoreError naming the first few instead."""
        miss = self.missing()
        if miss and strict:
            shown = ", ".join(f"{key!r} (sample {i})" for i, _, key in miss[:5])
            more = f" and {len(miss) - 5} more" if len(miss) > 5 else ""
            raise StoreError(f"{len(miss)} image(s) are not in the code store {self.store.root}: {shown}{more}; "
                             "encode the data's image folder into that store with viqctl encode (ids are paths "
                             "relative to the folder encoded)")
        return miss

    def __getitem__(self, pos: int) -> Union[OfflineItem, Skipped]:
        s = self.samples[pos]
        keys, codes = [], []
        for k, ref in enumerate(s.images):
            key = self._lookup(ref)
            if key is None:
                return Skipped(s.index, s.id,
                               f"image {k} {store_key(ref)!r} is not in the code store {self.store.root}")
            keys.append(key)
            codes.append(torch.from_numpy(self.store.get(key).codes))
        enc = encode_conversation(s, self.tokenizer, self.template, self.image_token_id)
        return OfflineItem(s.index, s.id, keys, codes, enc.input_ids, enc.labels, enc.image_positions, self.name)


# ---- packing ----------------------------------------------------------------------------------


@dataclass
class PackedSequence:
    """One row: whole samples back to back, image placeholders expanded to their LLM spans, padded at the end.

    ``input_ids`` hold ``pad_id`` inside image spans and padding (the spans are overwritten with
    image embeddings); labels are IGNORE_INDEX everywhere except answers; ``position_ids`` restart at
    0 for every sample and for the padding, which is a segment of its own.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    image_spans: list[tuple[int, int]]  # (start, n_tokens) per image, in order
    grids: list[tuple[int, int]]
    image_keys: list[str]
    images: list = field(default_factory=list)  # payload per image (codes or pixels), may be empty
    samples: list[tuple[str, int, Optional[str]]] = field(default_factory=list)  # (data set, index, id)
    n_pad: int = 0

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_image_tokens(self) -> int:
        return sum(n for _, n in self.image_spans)

    @property
    def n_text_tokens(self) -> int:
        return self.length - self.n_image_tokens - self.n_pad

    @property
    def n_supervised(self) -> int:
        return sum(1 for v in self.labels if v != IGNORE_INDEX)

    def segment_lengths(self) -> list[int]:
        """Lengths of the attention segments (samples, then padding)."""
        starts = [i for i, p in enumerate(self.position_ids) if p == 0] + [self.length]
        return [b - a for a, b in zip(starts[:-1], starts[1:])]


def item_grids(item, patch: int = 16) -> list[tuple[int, int]]:
    """Patch grids of an item: ``item.grids`` (offline items) or from its pixels (3, H, W)."""
    grids = getattr(item, "grids", None)
    if grids is not None:
        return list(grids)
    return [(-(-int(t.shape[1]) // patch), -(-int(t.shape[2]) // patch)) for t in item.images]


def expanded_length(item, image_tokens: TokensFn) -> int:
    """Positions a sample takes once every placeholder is replaced by its image span."""
    return len(item.input_ids) + sum(image_tokens(g) - 1 for g in item_grids(item))


def pack_items(items: Sequence, length: int, image_tokens: TokensFn, pad_id: int = 0,
               keep_images: bool = True) -> tuple[list[PackedSequence], list[Skipped]]:
    """Greedy in-order packing of whole samples into rows of exactly ``length`` positions.

    A sample that does not fit the space left closes the row (padded at the end) and starts the
    next; one longer than ``length`` on its own is skipped with its reason (never cut: cutting
    could split an image span). ``Skipped`` inputs pass through. Items are ``OfflineItem`` (codes
    as payload) or anything with ``input_ids``, ``labels``, ``image_positions`` and ``images``
    (pixels, e.g. ``viq.mllm.collate.Item``); the payload is kept when ``keep_images``.
    """
    if length < 2:
        raise ConfigError(f"a packed sequence needs at least 2 positions, got {length}")
    rows: list[PackedSequence] = []
    skipped: list[Skipped] = []
    cur: Optional[PackedSequence] = None

    def close(row: PackedSequence) -> None:
        pad = length - row.length
        row.input_ids += [pad_id] * pad
        row.labels += [IGNORE_INDEX] * pad
        row.position_ids += list(range(pad))
        row.n_pad = pad
        rows.append(row)

    for item in items:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        grids = item_grids(item)
        spans = [image_tokens(g) for g in grids]
        n = len(item.input_ids) + sum(s - 1 for s in spans)
        if n > length:
            skipped.append(Skipped(item.index, item.id, f"it takes {n} positions with its image spans, more than "
                                                        f"the packed length {length}"))
            continue
        if cur is not None and cur.length + n > length:
            close(cur)
            cur = None
        if cur is None:
            cur = PackedSequence([], [], [], [], [], [])
        base = cur.length
        ids, labs = cur.input_ids, cur.labels
        start, k = 0, 0
        positions = list(item.image_positions)
        for p in positions + [len(item.input_ids)]:
            ids += item.input_ids[start:p]
            labs += item.labels[start:p]
            if p < len(item.input_ids):
                cur.image_spans.append((len(ids), spans[k]))
                ids += [pad_id] * spans[k]
                labs += [IGNORE_INDEX] * spans[k]
                k += 1
            start = p + 1
        cur.position_ids += list(range(len(ids) - base))
        cur.grids += grids
        cur.image_keys += list(getattr(item, "image_keys", None) or [f"{item.index}:{k}" for k in range(len(grids))])
        if keep_images:
            cur.images += list(getattr(item, "codes", None) or getattr(item, "images", None) or [])
        cur.samples.append((getattr(item, "source", ""), item.index, item.id))
    if cur is not None:
        close(cur)
    return rows, skipped


@dataclass
class PackedBatch:
    """Rows flattened into one (1, B*L) sequence, the form the LLM receives."""

    input_ids: torch.Tensor  # (1, B*L) long
    labels: torch.Tensor  # (1, B*L) long
    position_ids: torch.Tensor  # (1, B*L) long
    image_mask: torch.Tensor  # (1, B*L) bool: positions filled by image embeddings
    grids: list[tuple[int, int]]
    images: list  # payload per image, in span order: codes (h, w, 4) or pixels (3, H, W)
    segments: list[int]  # attention segment lengths (samples and padding), for cu_seqlens
    rows: int = 1

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "PackedBatch":
        """Move to ``device``; floating image payloads (pixels) also to ``dtype``."""
        def move(t):
            t = t.to(device, non_blocking=True)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                           self.image_mask.to(device), list(self.grids), [move(t) for t in self.images],
                           list(self.segments), self.rows)


def collate_packed(rows: Sequence[PackedSequence], images: Optional[Sequence] = None) -> PackedBatch:
    """Rows -> one PackedBatch. ``images`` overrides the rows' own payload (same order as the spans)."""
    if not rows:
        raise ConfigError("no packed rows to collate")
    ids = torch.tensor([v for r in rows for v in r.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([v for r in rows for v in r.labels], dtype=torch.long)[None]
    pos = torch.tensor([v for r in rows for v in r.position_ids], dtype=torch.long)[None]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    offset = 0
    for r in rows:
        for s, n in r.image_spans:
            mask[0, offset + s: offset + s + n] = True
        offset += r.length
    grids = [g for r in rows for g in r.grids]
    payload = list(images) if images is not None else [im for r in rows for im in r.images]
    if len(payload) != len(grids):
        raise ConfigError(f"{len(payload)} images for {len(grids)} image spans")
    return PackedBatch(ids, labels, pos, mask, grids, payload, [n for r in rows for n in r.segment_lengths()],
                       len(rows))


def packed_batches(dataset, order: Sequence[int], length: int, image_tokens: TokensFn, pad_id: int = 0,
                   rows: int = 1) -> Iterator[tuple[PackedBatch, list[Skipped]]]:
    """Stream ``dataset[i]`` for ``i`` in ``order`` into PackedBatches of ``rows`` rows of ``length``.

    Yields (batch, samples skipped since the previous batch); the last batch may hold fewer rows.
    For a training loop: ``order`` is this rank's share of an epoch's permutation.
    """
    pending: list = []
    used = 0
    ready: list[PackedSequence] = []
    skipped: list[Skipped] = []
    for pos in order:
        item = dataset[pos]
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        n = expanded_length(item, image_tokens)
        if n > length:
            skipped.extend(pack_items([item], length, image_tokens, pad_id)[1])
            continue
        if used + n > length:
            ready += pack_items(pending, length, image_tokens, pad_id)[0]
            pending, used = [], 0
            if len(ready) == rows:
                yield collate_packed(ready), skipped
                ready, skipped = [], []
        pending.append(item)
        used += n
    if pending:
        ready += pack_items(pending, length, image_tokens, pad_id)[0]
    if ready:
        yield collate_packed(ready), skipped


# ---- image encoders ---------------------------------------------------------------------------


class OfflineImageEncoder(nn.Module):
    """Codes (h, w, 4) -> frozen ViQ embedder (the decoder part) -> trainable projector -> (L_i, H) each.

    ``embedder`` is a ``ViQModel`` holding the ``decoder`` part (e.g. ``load_tokenizer(...,
    parts=("decoder",)).model``). It stays frozen and in eval mode (the codes keep their meaning);
    it runs under no_grad, so only the projector builds a graph.
    """

    def __init__(self, embedder: nn.Module, projector: Projector):
        super().__init__()
        embedder.require("decoder")
        self.embedder = embedder.requires_grad_(False).eval()
        self.projector = projector

    def train(self, mode: bool = True):
        super().train(mode)
        self.embedder.eval()
        return self

    def features(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> embedder features (h*w, C) per image."""
        if not codes:
            return []
        flat = torch.cat([c.reshape(-1) for c in codes]).to(torch.int64)
        with torch.no_grad():
            feats = self.embedder.embed(flat)
        return list(feats.split([int(c.shape[0]) * int(c.shape[1]) for c in codes]))

    def forward(self, codes: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        grids = [(int(c.shape[0]), int(c.shape[1])) for c in codes]
        return [self.projector(f, g) for f, g in zip(self.features(codes), grids)], grids


class OnlineImageEncoder(nn.Module):
    """Pixels (3, H, W) -> continuous any-res SigLIP2 ViT (packed) -> projector -> (L_i, H) each.

    The LLaVA-style setup with the encoder in the loop. ``train_vit=False`` (the default, as in
    LLaVA's instruction tuning) keeps the ViT frozen under no_grad; ``True`` trains it too, with
    gradient checkpointing as the reference does.
    """

    def __init__(self, vit: AnyResViT, projector: Projector, train_vit: bool = False):
        super().__init__()
        self.vit, self.projector, self.train_vit = vit, projector, train_vit
        self.vit.requires_grad_(train_vit)
        self.vit.grad_checkpointing = train_vit
        if not train_vit:
            self.vit.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_vit:
            self.vit.eval()
        return self

    def features(self, pixels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        if not pixels:
            return [], []
        with torch.set_grad_enabled(self.train_vit and torch.is_grad_enabled()):
            tokens, packing = self.vit(list(pixels))
        return packing.split(tokens), list(packing.grids)

    def forward(self, pixels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        feats, grids = self.features(pixels)
        return [self.projector(f, g) for f, g in zip(feats, grids)], grids


# ---- the packed MLLM --------------------------------------------------------------------------


@dataclass
class PackedOutput:
    loss: torch.Tensor  # mean cross-entropy over the supervised tokens
    n_supervised: int
    n_tokens: int  # positions fed to the LLM (padding included)


class PackedMLLM(nn.Module):
    """Qwen2 (optionally peft-wrapped) fed packed rows; images from an Offline/Online image encoder.

    Several ``PackedMLLM`` may share one LLM (and projector): the bench runs both setups on one.
    """

    def __init__(self, llm: nn.Module, image_encoder: nn.Module):
        super().__init__()
        self.llm = llm
        self.image_encoder = image_encoder

    def _attn(self) -> Optional[str]:
        return getattr(getattr(self.llm, "config", None), "_attn_implementation", None)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Text embeddings with every image span replaced by the projected image features: (1, N, H)."""
        emb = self.llm.get_input_embeddings()
        embeds = emb(batch.input_ids)
        feats, grids = self.image_encoder(batch.images)
        if [tuple(g) for g in grids] != [tuple(g) for g in batch.grids]:
            raise ConfigError(f"image grids {grids} differ from the packed spans' grids {batch.grids}")
        if feats:
            flat = torch.cat(feats).to(embeds.dtype)
            n = int(batch.image_mask.sum())
            if flat.shape[0] != n:
                raise ConfigError(f"the images give {flat.shape[0]} LLM tokens but the packed spans hold {n}")
            embeds = embeds.masked_scatter(batch.image_mask[..., None], flat)
        return embeds

    def hidden(self, batch: PackedBatch, embeds: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states of the packed rows, samples kept apart as the attention allows."""
        kwargs, attn = {}, self._attn()
        if attn is not None and attn.startswith("flash_attention"):  # precomputed varlen boundaries: no host syncs
            cu = cu_seqlens(batch.segments, embeds.device)
            m = max(batch.segments)
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
        elif attn == VARLEN_SDPA:
            kwargs = dict(cu_seq_lens_q=cu_seqlens(batch.segments, "cpu"))  # read on the host
        return self.llm.get_decoder()(inputs_embeds=embeds, position_ids=batch.position_ids,
                                      use_cache=False, **kwargs).last_hidden_state

    def supervised(self, batch: PackedBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the supervised positions: t predicts t+1, never across a sample boundary."""
        target = batch.labels[:, 1:].masked_fill(batch.position_ids[:, 1:] == 0, IGNORE_INDEX)
        sel = target != IGNORE_INDEX
        return self.llm.get_output_embeddings()(hidden[:, :-1][sel]).float(), target[sel]

    def forward(self, batch: PackedBatch) -> PackedOutput:
        hidden = self.hidden(batch, self.embed(batch))
        logits, target = self.supervised(batch, hidden)
        if target.numel() == 0:
            return PackedOutput(hidden[:, :1].sum() * 0.0, 0, batch.n_tokens)
        return PackedOutput(F.cross_entropy(logits, target), int(target.numel()), batch.n_tokens)
