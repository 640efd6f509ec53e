"""From checked samples to packed micro-batches: image loading, tokenization, sharded batch plans.

A sample that fails while loading (unreadable image, image spans longer than the LLM context) comes
back as ``Skipped`` with its index and reason; the collator drops it from the batch and the loop
counts and reports it. Nothing is ever replaced by another sample (the reference did that silently,
reference-training.md §7.15).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image

from viq.data.conversations import (IMAGE_PLACEHOLDER_ID, BadSample, ImageRef, Resize, Sample, TextTokenizer,
                                    encode_conversation)
from viq.errors import ConfigError, ViQError
from viq.images import DEFAULT_MAX_PIXELS, load_rgb, to_pixels
from viq.packing import batches_by_budget


@dataclass
class Item:
    index: int  # the sample's index in its data file
    id: Optional[str]
    images: list[torch.Tensor]  # (3, H, W) in [-1, 1]
    input_ids: list[int]
    labels: list[int]
    image_positions: list[int]
    meta: dict = field(default_factory=dict)
    source: str = ""  # the data set's name: with index, a unique key of the sample


#: A sample left out at run time: the same record as a sample rejected when the data is read.
Skipped = BadSample


def _read_image(ref: ImageRef, max_pixels: Optional[int]) -> Image.Image:
    if ref.offset is None:
        return load_rgb(ref.path, max_pixels=max_pixels, name=ref.source)
    with open(ref.path, "rb") as fh:
        fh.seek(ref.offset)
        data = fh.read(ref.length)
    if len(data) != ref.length:
        raise ValueError(f"{ref.source}: only {len(data)} of {ref.length} bytes at offset {ref.offset}")
    if ref.base64:
        data = base64.b64decode(data)
    return load_rgb(data, max_pixels=max_pixels, name=f"{ref.source}@{ref.offset}")


def _image_size(ref: ImageRef) -> tuple[int, int]:
    """(W, H) from the file header only (no decoding), for token-budget batch plans."""
    if ref.offset is None:
        with Image.open(ref.path) as im:
            return im.size
    return _read_image(ref, None).size


class ConversationDataset(torch.utils.data.Dataset):
    """Good samples -> ``Item`` (pixels + ids + labels) or ``Skipped``; deterministic, no augmentation.

    ``projector_tokens(grid)`` gives the LLM positions one image takes, so samples whose image spans
    cannot fit ``max_length`` are skipped here instead of being cut later.
    """

    def __init__(self, samples: Sequence[Sample], tokenizer: TextTokenizer, template: str,
                 default_resize: Resize, max_length: int, patch: int = 16,
                 projector_tokens: Optional[Callable[[tuple[int, int]], int]] = None,
                 image_token_id: Optional[int] = None, max_input_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 name: str = "train"):
        self.samples = list(samples)
        self.name = name
        self.tokenizer, self.template = tokenizer, template
        self.default_resize, self.max_length, self.patch = default_resize, max_length, patch
        self.projector_tokens = projector_tokens
        self.image_token_id = image_token_id
        self.max_input_pixels = max_input_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def target_size(self, ref: ImageRef, size: tuple[int, int]) -> tuple[int, int]:
        return (ref.resize or self.default_resize).target_size(*size)

    def patch_tokens(self, pos: int) -> int:
        """ViT patch tokens of sample ``pos`` (header reads only)."""
        total = 0
        for ref in self.samples[pos].images:
            w, h = self.target_size(ref, _image_size(ref))
            total += math.ceil(w / self.patch) * math.ceil(h / self.patch)
        return total

    def __getitem__(self, pos: int) -> Union[Item, Skipped]:
        s = self.samples[pos]
        try:
            images = []
            for ref in s.images:
                img = _read_image(ref, self.max_input_pixels)
                size = self.target_size(ref, img.size)
                if size != img.size:
                    img = img.resize(size, Image.Resampling.BILINEAR)  # the reference's resize
                images.append(to_pixels(img))
            enc = encode_conversation(s, self.tokenizer, self.template, self.image_token_id)
        except (ViQError, OSError, ValueError) as exc:
            return Skipped(s.index, s.id, str(exc))
        if self.projector_tokens is not None and enc.image_positions:
            grids = [(math.ceil(t.shape[1] / self.patch), math.ceil(t.shape[2] / self.patch)) for t in images]
            spans = [self.projector_tokens(g) for g in grids]
            end = enc.image_positions[-1] + sum(n - 1 for n in spans) + 1
            if end > self.max_length:
                return Skipped(s.index, s.id, f"its image spans reach position {end} but llm.max_length is "
                                              f"{self.max_length} (use smaller images or a longer context)")
        meta = s.raw.get("meta") if isinstance(s.raw.get("meta"), dict) else {}
        return Item(s.index, s.id, images, enc.input_ids, enc.labels, enc.image_positions, meta, self.name)


@dataclass
class Batch:
    indices: list[int]  # file indices of the samples kept
    ids: list[Optional[str]]
    images: list[torch.Tensor]  # flat, sample by sample
    image_keys: list[tuple[str, int, int]]  # (data set, sample index, image number): frozen-target cache keys
    input_ids: list[list[int]]
    labels: list[list[int]]
    image_positions: list[list[int]]
    meta: list[dict]
    skipped: list[Skipped]

    @property
    def n_samples(self) -> int:
        return len(self.indices)

    def to(self, device) -> "Batch":
        """Move the images (the only tensors; ids stay lists) to ``device``, in place."""
        self.images = [t.to(device, non_blocking=True) for t in self.images]
        return self

    def patch_tokens(self, patch: int = 16) -> int:
        return sum(math.ceil(t.shape[1] / patch) * math.ceil(t.shape[2] / patch) for t in self.images)


def collate(items: Sequence[Union[Item, Skipped]]) -> Batch:
    """Keep the good items in order (their images packed flat), list the skipped ones."""
    good = [it for it in items if isinstance(it, Item)]
    return Batch(
        indices=[it.index for it in good], ids=[it.id for it in good],
        images=[img for it in good for img in it.images],
        image_keys=[(it.source, it.index, k) for it in good for k in range(len(it.images))],
        input_ids=[it.input_ids for it in good], labels=[it.labels for it in good],
        image_positions=[it.image_positions for it in good], meta=[it.meta for it in good],
        skipped=[it for it in items if isinstance(it, Skipped)])


class BatchPlan:
    """Which samples each rank reads in each epoch: a real shard per rank, equal step counts.

    Every epoch draws one permutation from (seed, epoch), deals it out round-robin to the ranks and
    cuts each rank's share into micro-batches of ``micro_batch`` samples, or of at most
    ``max_tokens`` ViT patch tokens when given. Every rank computes every rank's plan (it is cheap
    and deterministic) so all ranks take the same number of steps; the tail that does not fill a
    step on every rank is left for the next epoch's permutation.
    """

    def __init__(self, n: int, micro_batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, token_counts: Optional[Sequence[int]] = None,
                 max_tokens: Optional[int] = None):
        if max_tokens is not None and token_counts is None:
            raise ValueError("token budgets need the token count of every sample")
        self.n, self.micro_batch, self.world, self.rank = n, micro_batch, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.token_counts, self.max_tokens = token_counts, max_tokens
        if self.steps_per_epoch(0) == 0:
            raise ConfigError(f"{n} samples cannot fill one micro-batch of {micro_batch} on each of {world} "
                              "process(es); use more data or a smaller data.micro_batch_size")

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _rank_batches(self, order: list[int], rank: int) -> list[list[int]]:
        share = order[rank::self.world]
        if self.max_tokens is None:
            nb = len(share) // self.micro_batch
            return [share[i * self.micro_batch:(i + 1) * self.micro_batch] for i in range(nb)]
        groups = batches_by_budget([self.token_counts[i] for i in share], self.max_tokens)
        return [[share[j] for j in g] for g in groups]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (dataset positions) for ``epoch``."""
        order = self._order(epoch)
        plans = [self._rank_batches(order, r) for r in range(self.world)]
        steps = min(len(p) for p in plans)
        return plans[self.rank][:steps]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        order = self._order(epoch)
        return min(len(self._rank_batches(order, r)) for r in range(self.world))


def placeholder_id(tokenizer) -> int:
    """The id an ``<image>`` marker becomes: the tokenizer's own image token, else -200."""
    tid = getattr(tokenizer, "image_token_id", None)
    return IMAGE_PLACEHOLDER_ID if tid is None else tid
