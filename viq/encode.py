"""Encoding many images into a code store: resumable, batched by token budget, one bad file never
stops the run.

Each rank (under ``accelerate launch`` / ``torchrun``) takes its share of the sources, decodes and
preprocesses them on a few threads while the model encodes packed batches, and writes its own
shards. A source whose row already exists with the same sha256 is skipped, so running the same
command again after a kill finishes the job; a changed file is encoded again.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch.autograd import _profiler_enabled
from torch.profiler import record_function

from viq.errors import ImageError
from viq.heap import bound_heap
from viq.images import Preprocessor, parse_policy
from viq.packing import patch_grid
from viq.sources import DEFAULT_MAX_BYTES, Source, SourceReader, shard_for_rank
from viq.store import CodeStoreWriter, finalize_store
from viq.tokenizer import ViQTokenizer


@dataclass
class EncodeOptions:
    policy: str = "native"
    #: patch tokens per packed batch; None: sized for the free GPU memory, or CPU_TOKEN_BUDGET on CPU
    token_budget: int | None = None
    rows_per_shard: int = 256
    max_input_pixels: int | None = 178_956_970
    #: threads decoding ahead of the model; None: 0 on CPU (decoding between batches: threads take the
    #: cores from the model's own, measured slower by benchmarks/encode_folder.py), 4 on CUDA
    workers: int | None = None
    prefetch: int = 64
    #: torch.compile the encoder's MLPs (GPU: fuses bias + GELU; the first batches pay the compile)
    compile: bool = False
    max_input_bytes: int = DEFAULT_MAX_BYTES  # a bigger file (or one still growing) fails


@dataclass
class EncodeSummary:
    store: str
    rank: int
    world_size: int
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    resized: int = 0  # images the policy scaled (for native: larger than its pixel budget)
    redone: list[dict] = field(default_factory=list)  # damaged store rows encoded again ({id, source, reason})

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["images_per_s"] = round(self.images_per_s, 3)
        d["redone_count"] = len(self.redone)
        return d


def model_info(tok: ViQTokenizer, fingerprints: dict[str, str]) -> dict:
    """The model identity a store records: decoding refuses codes from a different model."""
    import hashlib

    enc, dec = fingerprints.get("encoder"), fingerprints.get("decoder")
    combined = hashlib.sha256(f"{enc}:{dec}".encode()).hexdigest()
    return {"name": tok.config.name, "source": tok.source, "levels": tok.levels,
            "codebook_size": tok.codebook_size, "fingerprint": combined,
            "compute_dtype": str(tok.dtype).removeprefix("torch."),  # bf16 codes differ from fp32 ones
            "encoder_fingerprint": enc, "decoder_fingerprint": dec,
            "config": tok.config.model_dump(mode="json")}


#: On CPU, GEMMs of 1024 rows already run at the machine's matmul rate (benchmarks/encode.py), while
#: activations grow with the batch: the head's FSQ blocks hold ~52 x width floats per patch.
CPU_TOKEN_BUDGET = 1024


def resolve_token_budget(options: EncodeOptions, tok: ViQTokenizer) -> int:
    """The options' budget, or one sized for the free memory of the tokenizer's CUDA device."""
    if options.token_budget is not None:
        return options.token_budget
    if tok.device.type != "cuda":
        return CPU_TOKEN_BUDGET
    import torch

    from viq.packing import token_budget_for_memory

    free, _ = torch.cuda.mem_get_info(tok.device)
    vit = tok.config.vit
    return token_budget_for_memory(free, vit.width, vit.mlp_hidden, torch.finfo(tok.dtype).bits // 8)


def resolve_workers(options: EncodeOptions, tok: ViQTokenizer) -> int:
    """The options' decode threads, or the measured default for the tokenizer's device."""
    if options.workers is not None:
        return options.workers
    return 4 if tok.device.type == "cuda" else 0


def _no_label(name: str):
    return nullcontext()


def _labeller() -> Callable:
    """torch.profiler's ``record_function`` while a profiler records (the ``viq.*`` labels that
    benchmarks/encode_folder.py reports), else a no-op: each label costs ~6 us even unrecorded,
    a tenth of the per-image work on small images."""
    return record_function if _profiler_enabled() else _no_label


def _prepared(sources: list[Source], prep: Preprocessor, writer: CodeStoreWriter, summary: EncodeSummary,
              options: EncodeOptions, workers: int, pin: bool = False) -> Iterator:
    """Yield (source, sha256, pixels, info) or (source, sha256, None, reason), in order, decoded ahead."""

    reader = SourceReader(options.max_input_bytes)
    record_function = _labeller()

    def work(src: Source):
        try:  # one read: files, tar members and dataset rows alike; only regular files are opened
            with record_function("viq.read"):
                data = reader.read(src)
        except ImageError as exc:
            return src, None, None, str(exc)
        with record_function("viq.sha256"):
            digest = hashlib.sha256(data).hexdigest()
        if not writer.needs_encoding(src.id, digest):
            return src, digest, None, None
        try:
            with record_function("viq.decode_resize"):
                pixels, info = prep(data, name=src.name)
            if pin:  # page-locked here, in the worker thread, so the copy to the GPU does not block
                pixels = pixels.pin_memory()
            return src, digest, pixels, info
        except ImageError as exc:
            return src, digest, None, str(exc)
        except Exception as exc:  # a decoder bug in a plugin must not stop the run either
            return src, digest, None, f"{src.name}: unexpected error while decoding ({type(exc).__name__}: {exc})"

    if workers <= 0:  # decode in this thread, between batches
        for src in sources:
            yield work(src)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        it = iter(sources)
        for src in it:
            pending.append(pool.submit(work, src))
            if len(pending) >= options.prefetch:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def encode_to_store(sources: list[Source], tok: ViQTokenizer, out, fingerprints: dict[str, str],
                    options: EncodeOptions | None = None, rank: int = 0, world_size: int = 1,
                    progress: Callable[[int], None] | None = None,
                    barrier: Callable[[], None] | None = None, finalize: bool = True) -> EncodeSummary:
    """Encode this rank's share of ``sources`` into the store at ``out``; rank 0 finalizes it
    (unless ``finalize`` is False: jobs of a ``--shard I/N`` array may still be writing)."""
    options = options or EncodeOptions()
    policy = parse_policy(options.policy)
    prep = Preprocessor(policy, options.max_input_pixels)
    mine = shard_for_rank(sources, rank, world_size)
    summary = EncodeSummary(str(out), rank, world_size, total=len(mine))
    start = time.perf_counter()
    budget = resolve_token_budget(options, tok)
    cuda = tok.device.type == "cuda"
    if options.compile:
        tok.model.compile_encoder()
    if tok.device.type == "cpu":  # freed activations leave resident memory (glibc; a no-op elsewhere)
        bound_heap()
    writer = CodeStoreWriter(out, model_info(tok, fingerprints), policy.describe(), rank, world_size,
                             options.rows_per_shard)
    batch: list = []
    used = 0
    record_function = _labeller()

    def run_batch():
        nonlocal batch, used
        if not batch:
            return
        with record_function("viq.model"):
            codes = tok.encode_pixels([b[2] for b in batch])
        for (src, digest, pixels, info), c in zip(batch, codes):
            w, h = info.size
            with record_function("viq.store"):
                writer.add(src.id, src.name, digest, w, h, c.numpy())
            if (bad := writer.damaged_row(src.id)) is not None:
                summary.redone.append(bad)
            summary.tokens += c.shape[0] * c.shape[1]
            summary.resized += info.size != info.original_size
        summary.encoded += len(batch)
        if progress:
            progress(len(batch))
        batch, used = [], 0

    with writer:
        for src, digest, pixels, info in _prepared(mine, prep, writer, summary, options, resolve_workers(options, tok), pin=cuda):
            if pixels is None:
                if info is None and digest is not None:
                    summary.skipped += 1
                else:
                    reason = info if isinstance(info, str) else "unknown error"
                    writer.add_failure(src.id, src.name, reason)
                    summary.failed += 1
                    summary.failures.append({"id": src.id, "source": src.name, "reason": reason})
                if progress:
                    progress(1)
                continue
            h, w = patch_grid(pixels.shape[2], pixels.shape[1], tok.patch)
            if batch and used + h * w > budget:
                run_batch()
            batch.append((src, digest, pixels, info))
            used += h * w
        run_batch()
    if barrier is not None:
        barrier()
    if rank == 0 and finalize:
        finalize_store(out)
    if barrier is not None:
        barrier()
    summary.seconds = time.perf_counter() - start
    return summary


def merge_summaries(parts: list[dict]) -> EncodeSummary:
    """One summary for the whole run from every rank's ``as_dict()``."""
    first = parts[0]
    merged = EncodeSummary(first["store"], 0, len(parts))
    for p in parts:
        merged.total += p["total"]
        merged.encoded += p["encoded"]
        merged.skipped += p["skipped"]
        merged.failed += p["failed"]
        merged.failures.extend(p["failures"])
        merged.tokens += p["tokens"]
        merged.resized += p.get("resized", 0)
        merged.redone.extend(p.get("redone", []))
        merged.seconds = max(merged.seconds, p["seconds"])
    merged.failures.sort(key=lambda f: f["id"])
    return merged
