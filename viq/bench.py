"""How much faster MLLM training gets on offline codes: the paper's speed-up, measured.

Two setups train the same LLM + projector on the same packed batches (same text, same number and
sizes of images, same positions):

* online  (LLaVA-style): pixels -> continuous any-res SigLIP2 ViT -> projector -> LLM;
* offline (ViQ): codes read from a code store -> frozen ViQ embedder -> projector -> LLM.

The offline side is the real training path of ``viq.mllm.offline``: a conversation file and a code
store are written to a work folder, read back through ``OfflineConversationDataset`` and packed by
``pack_items``. Optionally the one-time extraction (ViT + head encode) is timed per image, so its
cost can be amortised (``break_even_epochs``).

Honest timing: the same process times both setups alternately (ABBA order, so drift and ordering
hit both), after warm-up steps, with device synchronisation around every step; the median and the
spread over repeats, the peak memory and tokens/s are reported. LLMs are built from the real
Qwen2.5 configurations with random weights (no downloads): timing does not depend on the values.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from viq.config import ViQConfig, giant_config, so400m_config, tiny_config
from viq.errors import ConfigError

SCHEMA = "viq-bench v1"

#: The real Qwen2.5 base configurations (config.json on the Hub), used with random weights.
#: All share rope_theta 1e6, rms_norm_eps 1e-6, SiLU, max_position_embeddings 32768 (7B: 131072).
#: "tiny" keeps 0.5B's proportions (FLOPs per token of the ViT vs the LLM, lm_head share) at CPU size.
QWEN25 = {
    #         hidden  ffn   layers heads kv  vocab   tied
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "3b": (2048, 11008, 36, 16, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
    "tiny": (128, 704, 6, 4, 2, 4096, True),
}
LLM_NAMES = tuple(QWEN25)


def qwen2_config(name: str, max_positions: int = 32768, attn_implementation: str = "sdpa"):
    """A ``transformers.Qwen2Config`` for one of ``QWEN25``."""
    from transformers import Qwen2Config

    if name not in QWEN25:
        raise ConfigError(f"unknown LLM size {name!r}; choose from {', '.join(LLM_NAMES)}")
    hidden, ffn, layers, heads, kv, vocab, tied = QWEN25[name]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, hidden_act="silu", rms_norm_eps=1e-6,
                      rope_theta=1e6, max_position_embeddings=max(32768, max_positions), tie_word_embeddings=tied,
                      use_cache=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def encoder_config(name: str) -> ViQConfig:
    """giant (SigLIP2 g/16, 1536 x 40), so400m (1152 x 27), or tiny: giant scaled to CPU size
    (width 224, depth 10), keeping its FLOPs per patch at about 3x those of the tiny LLM per token,
    as giant is to Qwen2.5-0.5B."""
    if name == "giant":
        return giant_config("16k")
    if name == "so400m":
        return so400m_config("16k")
    if name == "tiny":
        return tiny_config("16k", width=224, depth=10, heads=4, pos_grid=32)
    raise ConfigError(f"unknown encoder {name!r}; choose giant, so400m or tiny")


# ---- configuration ----------------------------------------------------------------------------


def parse_seq(text: str) -> list[int]:
    """``"4k,16k"`` / ``"4096"`` -> [4096, 16384]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m:
            raise ConfigError(f"sequence length {part!r} must look like 4096 or 4k")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def parse_size(text) -> tuple[int, int]:
    """``"896"`` -> (896, 896); ``"1024x768"`` -> (1024, 768) as (width, height)."""
    if isinstance(text, (list, tuple)):
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m:
        raise ConfigError(f"image size {text!r} must look like 896 or 1024x768 (width x height)")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


class BenchConfig(BaseModel):
    """What to measure. ``None`` fields take device-dependent defaults in ``resolved()``.

    GPU defaults mirror the paper's figure: Qwen2.5 0.5B/1.5B/3B/7B, 4K/8K/16K packed sequences,
    SigLIP2-g, images of 896x896 (the reference recipe's default resize area: 56x56 patches, 814
    LLM tokens after 2x2 pooling). CPU defaults are a scaled-down copy (tiny LLM and encoder,
    1K/2K/4K sequences, 448x448 images) that finishes in about two minutes.
    """

    model_config = ConfigDict(extra="forbid")

    seq_lens: Optional[list[int]] = None
    llms: Optional[list[str]] = None
    encoder: Optional[Literal["giant", "so400m", "tiny"]] = None
    #: images per packed sequence; None = auto: about 40 % of the positions are image tokens.
    images_per_seq: Optional[int] = Field(None, ge=1)
    image_size: Optional[tuple[int, int]] = None  # (width, height), multiples of 16
    #: packed sequences per step (flattened into one varlen batch)
    rows: int = Field(1, ge=1)
    modes: list[Literal["forward", "train"]] = Field(default_factory=lambda: ["forward", "train"])
    warmup: Optional[int] = Field(None, ge=0)
    repeats: Optional[int] = Field(None, ge=1)
    include_extraction: bool = False
    #: online setup: train the ViT too (default: frozen under no_grad, as LLaVA's instruction tuning)
    train_vit: bool = False
    #: full: the whole LLM trains (LLaVA SFT); lora/dora: r=64 adapters on all linears, base frozen
    llm_train: Literal["full", "lora", "dora"] = "full"
    grad_checkpointing: bool = True
    device: str = "auto"
    dtype: str = "auto"
    #: LLM attention. auto: flash_attention_2 on CUDA when installed, else varlen_sdpa (SDPA per packed
    #: sample, the cost shape of flash varlen); sdpa: one masked L x L SDPA per row (O(L^2)).
    attn: Literal["auto", "flash_attention_2", "varlen_sdpa", "sdpa", "eager"] = "auto"
    lr: float = 1e-5
    seed: int = 0
    #: CPU threads for the run (None: torch's default). On a shared or busy CPU, 1 gives steadier numbers.
    threads: Optional[int] = Field(None, ge=1)
    #: where the conversation file and code store are written (default: a temp folder, removed after)
    workdir: Optional[str] = None

    @field_validator("llms")
    @classmethod
    def _llms(cls, v):
        if v is not None:
            bad = [n for n in v if n not in QWEN25]
            if bad or not v:
                raise ValueError(f"unknown LLM size(s) {bad}; choose from {', '.join(LLM_NAMES)}")
        return v

    @field_validator("seq_lens")
    @classmethod
    def _seqs(cls, v):
        if v is not None and (not v or any(s < 64 for s in v)):
            raise ValueError("sequence lengths must be >= 64")
        return v

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v):
        if v is None:
            return v
        w, h = parse_size(v)
        if w < 32 or h < 32 or w % 16 or h % 16:
            raise ValueError(f"image size {w}x{h}: sides must be multiples of 16 and >= 32")
        return (w, h)

    def resolved(self) -> "BenchConfig":
        """A copy with every default filled for the device it will run on."""
        from viq.tokenizer import resolve_dtype

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        gpu = device.startswith("cuda")
        dtype = str(resolve_dtype(self.dtype, device)).replace("torch.", "")
        attn = self.attn
        if attn == "auto":
            attn = "flash_attention_2" if gpu and dtype != "float32" and _flash_version() else "varlen_sdpa"
        upd = dict(device=device, dtype=dtype, attn=attn)
        defaults = dict(seq_lens=[4096, 8192, 16384] if gpu else [1024, 2048, 4096],
                        llms=["0.5b", "1.5b", "3b", "7b"] if gpu else ["tiny"],
                        encoder="giant" if gpu else "tiny",
                        image_size=(896, 896) if gpu else (448, 448),
                        warmup=2 if gpu else 1, repeats=5 if gpu else 3)
        for k, v in defaults.items():
            if getattr(self, k) is None:
                upd[k] = v
        return self.model_copy(update=upd)


# ---- results ----------------------------------------------------------------------------------


@dataclass
class BenchResult:
    machine: dict
    config: dict
    runs: list[dict] = field(default_factory=list)
    extraction: Optional[dict] = None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "machine": self.machine, "config": self.config, "runs": self.runs,
                "extraction": self.extraction}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _flash_version() -> Optional[str]:
    try:
        import flash_attn

        return getattr(flash_attn, "__version__", "installed")
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, dtype: str, attn: str) -> dict:
    import transformers

    info = {"device": device, "device_name": _cpu_name(), "dtype": dtype,
            "attn_implementation": attn, "torch": torch.__version__, "transformers": transformers.__version__,
            "flash_attn": _flash_version(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["device_memory_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return info


def stats(times: list[float]) -> dict:
    """Median and spread of step times (seconds)."""
    med = statistics.median(times)
    q1, q3 = (statistics.quantiles(times, n=4, method="inclusive")[i] for i in (0, 2)) if len(times) > 1 else (med, med)
    return {"times_s": [round(t, 6) for t in times], "median_s": med, "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "std_s": statistics.pstdev(times), "iqr_s": q3 - q1}


# ---- timing helpers ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _rss_bytes() -> Optional[int]:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or on CPU the peak RSS sampled every 2 ms."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "cpu_peak_rss"
        self.peak: Optional[int] = None
        self.before: Optional[int] = None  # resident at the start: weights, optimizer state, data

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
            self.before = torch.cuda.memory_allocated(torch.device(self.device))
            return self
        self._stop = threading.Event()
        self.peak = self.before = _rss_bytes()

        def sample():
            while not self._stop.wait(0.002):
                r = _rss_bytes()
                if r is not None and (self.peak is None or r > self.peak):
                    self.peak = r

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            self.peak = torch.cuda.max_memory_allocated(torch.device(self.device))
        else:
            self._stop.set()
            self._thread.join()
            r = _rss_bytes()
            if r is not None and (self.peak is None or r > self.peak):
                self.peak = r


# ---- synthetic data through the real offline path --------------------------------------------


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


# ---- models -----------------------------------------------------------------------------------


def build_llm(name: str, device: str, dtype: torch.dtype, attn: str, max_positions: int, seed: int = 0,
              llm_train: str = "full", grad_checkpointing: bool = True) -> nn.Module:
    """A random-weight Qwen2.5 of size ``name``, built directly on ``device``."""
    from transformers import Qwen2ForCausalLM

    if attn == "varlen_sdpa":
        from viq.mllm.offline import register_varlen_sdpa

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


def _n_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _oom_types() -> tuple:
    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(t for t in types if t is not None) or (RuntimeError,)


# ---- the measurement --------------------------------------------------------------------------

ProgressFn = Callable[[str, int, int], None]  # (what is running, steps done, steps total)


def _step(model, batch, opt, train: bool):
    if not train:
        with torch.no_grad():
            return model(batch)
    opt.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    opt.step()
    return out


def time_pair(fns: dict, device: str, warmup: int, repeats: int, tick=None) -> dict:
    """Time ``fns`` (name -> callable) alternately: warm-up rounds, then ABBA-ordered timed rounds.

    Returns name -> {"times": [...], "peak": bytes or None}. Every step is bracketed by device syncs.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            _sync(device)
            if tick:
                tick()
    out = {n: {"times": [], "peak": None, "before": None} for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            with PeakMemory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                fns[n]()
                _sync(device)
                dt = time.perf_counter() - t0
            out[n]["times"].append(dt)
            if mem.peak is not None:
                out[n]["peak"] = max(out[n]["peak"] or 0, mem.peak)
                out[n]["before"] = mem.before
            if tick:
                tick()
    return out


def run_bench(cfg: BenchConfig, progress: Optional[ProgressFn] = None) -> BenchResult:
    """Measure online vs offline MLLM training for every (LLM, sequence length, mode) of ``cfg``.

    ``progress(label, done, total)`` is called as steps complete. A configuration that runs out of
    device memory is recorded with ``status: "oom"`` and the others still run.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig, progress: Optional[ProgressFn]) -> BenchResult:
    from viq.mllm.model import Projector
    from viq.mllm.offline import OfflineImageEncoder, OnlineImageEncoder, PackedMLLM, collate_packed
    from viq.model.viq_model import ViQModel
    from viq.tokenizer import resolve_dtype

    cfg = cfg.resolved()
    device, dtype = cfg.device, resolve_dtype(cfg.dtype, cfg.device)
    result = BenchResult(machine_info(device, cfg.dtype, cfg.attn), cfg.model_dump(mode="json"))
    vcfg = encoder_config(cfg.encoder)
    width = vcfg.vit.width
    counter = Projector(8, 8)  # only for token counts: they depend on the grid alone
    tok = bench_tokenizer()
    overhead = template_overhead(tok)
    layouts = [plan_layout(s, cfg.image_size, counter.num_tokens, overhead, cfg.images_per_seq) for s in cfg.seq_lens]

    steps_per_mode = 2 * (cfg.warmup + cfg.repeats)
    total = len(cfg.llms) * len(layouts) * len(cfg.modes) * steps_per_mode
    total += steps_per_mode // 2 if cfg.include_extraction else 0
    done = [0]

    def tick(label):
        def f():
            done[0] += 1
            if progress:
                progress(label, done[0], total)
        return f

    with torch.random.fork_rng(devices=[]), _workdir(cfg.workdir) as work:
        torch.manual_seed(cfg.seed)
        if progress:
            progress("building data and encoder", 0, total)
        batches = {}
        for lay in layouts:
            rows, report = build_batches(Path(work) / f"seq{lay.seq_len}", lay, cfg.rows, vcfg.head.levels,
                                         counter.num_tokens, cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed)
            w, h = lay.image_size
            pixels = {k: (torch.rand(3, h, w, generator=g) * 2 - 1) for r in rows for k in r.image_keys}
            offline = collate_packed(rows).to(device)
            online = collate_packed(rows, images=[pixels[k] for r in rows for k in r.image_keys]).to(device, dtype)
            batches[lay.seq_len] = (rows, offline, online, report)

        with torch.device(device):  # two models: the online graph must not hold the embedder, nor vice versa
            encoder = ViQModel(vcfg, parts=("encoder",)).to(dtype).eval().requires_grad_(False)
            embedder = ViQModel(vcfg, parts=("decoder",)).to(dtype).eval().requires_grad_(False)

        if cfg.include_extraction:
            lay = layouts[0]
            imgs = batches[lay.seq_len][2].images

            def extract():
                with torch.inference_mode():
                    encoder.encode(list(imgs))

            label = "extraction (ViT + head encode)"
            t = time_pair({"extract": extract}, device, cfg.warmup, cfg.repeats, tick(label))["extract"]
            per = [x / len(imgs) for x in t["times"]]
            result.extraction = {"encoder": cfg.encoder, "image_size": list(lay.image_size),
                                 "images_per_call": len(imgs), "per_image": stats(per),
                                 "images_per_s": 1.0 / statistics.median(per), "peak_mem_bytes": t["peak"]}

        for name in cfg.llms:
            _free(device)
            label = f"LLM {name}: building"
            if progress:
                progress(label, done[0], total)
            try:
                llm = build_llm(name, device, dtype, cfg.attn, max(cfg.seq_lens), cfg.seed, cfg.llm_train,
                                cfg.grad_checkpointing)
            except _oom_types() as exc:
                for lay in layouts:
                    for mode in cfg.modes:
                        result.runs.append(_failed(cfg, name, lay, mode, "oom", exc))
                        done[0] += steps_per_mode
                continue
            hidden = llm.get_input_embeddings().embedding_dim
            with torch.device(device):
                projector = Projector(width, hidden, "oryx_mlp_v2", "2x").to(dtype)
            online_model = PackedMLLM(llm, OnlineImageEncoder(encoder.vit, projector, cfg.train_vit)).train()
            offline_model = PackedMLLM(llm, OfflineImageEncoder(embedder, projector)).train()
            params = {id(p): p for m in (online_model, offline_model) for p in m.parameters() if p.requires_grad}
            fused = device.startswith("cuda")
            opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, fused=fused) if fused else \
                torch.optim.AdamW(list(params.values()), lr=cfg.lr)
            sizes = {"llm_params": _n_params(llm), "trainable_params": sum(p.numel() for p in params.values()),
                     "vit_params": _n_params(encoder.vit), "embedder_params": _n_params(embedder)}
            for lay in layouts:
                rows, off_b, on_b, report = batches[lay.seq_len]
                for mode in cfg.modes:
                    train = mode == "train"
                    label = f"LLM {name}, seq {lay.seq_len}, {mode}"
                    outs = {}

                    def run(model, b, key):
                        def f():
                            outs[key] = _step(model, b, opt, train)
                        return f

                    failed = None
                    try:
                        t = time_pair({"online": run(online_model, on_b, "online"),
                                       "offline": run(offline_model, off_b, "offline")},
                                      device, cfg.warmup, cfg.repeats, tick(label))
                    except _oom_types() as exc:
                        failed = _failed(cfg, name, lay, mode, "oom", exc)
                    if failed is not None:  # outside the except block: its frames no longer hold tensors
                        opt.zero_grad(set_to_none=True)
                        outs.clear()
                        _free(device)
                        result.runs.append(failed)
                        done[0] = min(total, done[0] + steps_per_mode)
                        continue
                    result.runs.append(_run_record(cfg, name, lay, mode, rows, t, outs, sizes, report,
                                                   result.extraction))
                    outs.clear()
            del online_model, offline_model, opt, params, projector, llm
    _free(device)
    return result


@contextmanager
def _workdir(path: Optional[str]):
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="viq-bench-") as tmp:
        yield tmp


def _base_record(cfg: BenchConfig, name: str, lay: SeqLayout, mode: str) -> dict:
    return {"llm": name, "seq_len": lay.seq_len, "mode": mode, "encoder": cfg.encoder, "rows": cfg.rows,
            "images_per_seq": lay.n_images, "image_size": list(lay.image_size),
            "vit_tokens_per_image": lay.vit_tokens, "llm_tokens_per_image": lay.image_tokens}


def _failed(cfg, name, lay, mode, status, exc) -> dict:
    rec = _base_record(cfg, name, lay, mode)
    rec.update(status=status, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
               online=None, offline=None, speedup=None, ratio=None)
    return rec


def _run_record(cfg, name, lay, mode, rows, t, outs, sizes, report, extraction) -> dict:
    rec = _base_record(cfg, name, lay, mode)
    n_tokens = sum(r.length for r in rows)
    rec.update(status="ok", tokens_per_step=n_tokens,
               image_tokens_per_step=sum(r.n_image_tokens for r in rows),
               text_tokens_per_step=sum(r.n_text_tokens for r in rows),
               pad_tokens_per_step=sum(r.n_pad for r in rows),
               supervised_tokens_per_step=outs["offline"].n_supervised,
               same_inputs=outs["online"].n_supervised == outs["offline"].n_supervised
               and outs["online"].n_tokens == outs["offline"].n_tokens)
    kind = "cuda_max_allocated" if cfg.device.startswith("cuda") else "cpu_peak_rss"
    for setup in ("online", "offline"):
        s = stats(t[setup]["times"])
        s.update(tokens_per_s=n_tokens / s["median_s"], peak_mem_bytes=t[setup]["peak"],
                 mem_before_bytes=t[setup]["before"], mem_kind=kind,
                 loss=float(outs[setup].loss.detach().float()))
        rec[setup] = s
    on, off = rec["online"]["median_s"], rec["offline"]["median_s"]
    rec["speedup"] = (on - off) / on  # the paper's definition
    rec["ratio"] = on / off
    rec.update(sizes)
    rec.update(report)
    rec["break_even_epochs"] = None
    if extraction and mode == "train" and on > off:
        saved_per_image = (on - off) / (lay.n_images * cfg.rows)
        rec["break_even_epochs"] = extraction["per_image"]["median_s"] / saved_per_image
    return rec


# ---- plot -------------------------------------------------------------------------------------


def plot_result(result, path, modes: Optional[list[str]] = None) -> Path:
    """Grouped bars like the paper's figure: per LLM size, one bar per sequence length, height = speed-up %.

    One panel per mode (forward, train) measured, or those in ``modes``. Needs matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'viq[plot]' (or pip install matplotlib)") from None
    data = result.to_dict() if isinstance(result, BenchResult) else result
    ok = [r for r in data["runs"] if r["status"] == "ok"]
    modes = modes or [m for m in ("forward", "train") if any(r["mode"] == m for r in ok)] or ["train"]
    llms = list(dict.fromkeys(r["llm"] for r in data["runs"]))
    seqs = sorted({r["seq_len"] for r in data["runs"]})
    panel_w = max(3.2, 0.9 + 0.45 * len(llms) * len(seqs))
    fig, axes = plt.subplots(1, len(modes), figsize=(panel_w * len(modes), 3.8), dpi=150, squeeze=False,
                             sharey=True)
    width = 0.8 / max(1, len(seqs))
    for ax, mode in zip(axes[0], modes):
        for j, s in enumerate(seqs):
            xs, ys = [], []
            for i, name in enumerate(llms):
                hit = [r for r in ok if r["mode"] == mode and r["llm"] == name and r["seq_len"] == s]
                if hit:
                    xs.append(i + (j - (len(seqs) - 1) / 2) * width)
                    ys.append(100 * hit[0]["speedup"])
            label = f"{s // 1024}K" if s % 1024 == 0 else str(s)
            bars = ax.bar(xs, ys, width, label=label)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}%", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(llms)), [n.upper() if n[0].isdigit() else n for n in llms])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title("training step" if mode == "train" else "forward only", fontsize=9)
        ax.legend(title="sequence", fontsize=7, title_fontsize=7)
    top = max([100 * r["speedup"] for r in ok] + [1.0])
    axes[0][0].set_ylim(top=1.35 * top)  # room for the legend above the bars
    axes[0][0].set_ylabel("speed-up of offline codes [%]")
    m = data["machine"]
    fig.suptitle(f"(t_online - t_offline) / t_online, {data['config']['encoder']} ViT in the loop vs codes\n"
                 f"{m['device_name']}, {m['dtype']}, {m['attn_implementation']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
