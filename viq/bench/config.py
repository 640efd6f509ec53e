"""What a bench measures: the Qwen2.5 and encoder sizes, and the options with device defaults."""

from __future__ import annotations

import re
from typing import Literal, Optional

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
    1K/2K/4K sequences, 448x448 images, one thread) that finishes in about a minute on 2 cores.
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
    #: CPU threads for the run (None: 1 on CPU, where the scaled-down steps are fastest and steadiest on one
    #: thread; torch's default on a GPU machine).
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
        from viq.tokenizer import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        gpu = device.startswith("cuda")
        dtype = str(resolve_dtype(self.dtype, device)).replace("torch.", "")
        attn = self.attn
        if attn == "auto":
            attn = "flash_attention_2" if gpu and dtype != "float32" and flash_version() else "varlen_sdpa"
        upd = dict(device=device, dtype=dtype, attn=attn)
        defaults = dict(seq_lens=[4096, 8192, 16384] if gpu else [1024, 2048, 4096],
                        llms=["0.5b", "1.5b", "3b", "7b"] if gpu else ["tiny"],
                        encoder="giant" if gpu else "tiny",
                        image_size=(896, 896) if gpu else (448, 448),
                        warmup=2 if gpu else 1, repeats=5,
                        threads=None if gpu else 1)  # 1: small CPU steps lose time to threads, and vary less
        for k, v in defaults.items():
            if getattr(self, k) is None:
                upd[k] = v
        return self.model_copy(update=upd)


#: BenchConfig field -> the viqctl bench option that sets it, for one-line errors
OPTION_OF = {"seq_lens": "--seq", "llms": "--llm", "encoder": "--encoder", "images_per_seq": "--images-per-seq",
             "image_size": "--image-size", "rows": "--rows", "modes": "--mode", "warmup": "--warmup",
             "repeats": "--repeats", "llm_train": "--llm-train", "attn": "--attn", "threads": "--threads"}


def bench_config(**fields) -> BenchConfig:
    """A BenchConfig, or one ConfigError line per bad field, named by its viqctl option."""
    from pydantic import ValidationError

    try:
        return BenchConfig(**fields)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            name = str(e["loc"][0]) if e.get("loc") else "?"
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            value = fields.get(name)
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            lines.append(f"{OPTION_OF.get(name, name)} {shown}: {msg}")
        raise ConfigError("; ".join(lines)) from None


def flash_version() -> Optional[str]:
    try:
        import flash_attn

        return getattr(flash_attn, "__version__", "installed")
    except Exception:
        return None
