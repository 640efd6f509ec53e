"""The sections of a recipe: every training knob is a typed field of one of them.

Recipe (schema.py) puts them together and checks the rules that span sections; the architecture
itself is not restated here (a recipe's ``model:`` is viq.config.ViQConfig).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, field_validator, model_validator)


Arch = Literal["giant", "so400m", "tiny"]


class Section(BaseModel):
    """A recipe section: unknown keys are errors (a typo never passes as a default)."""

    model_config = ConfigDict(extra="forbid")


# ---- sections ---------------------------------------------------------------------------------


class RunSection(Section):
    """What the run is and where it writes."""

    name: str = "viq"
    #: tokenizer: ViT + head inside the MLLM (stages 1, 2-1, 2-2, single stage);
    #: decoder: the pixel-decoder stage on frozen codes; mllm_offline: an MLLM trained on a code store.
    task: Literal["tokenizer", "decoder", "mllm_offline"] = "tokenizer"
    #: set by load_recipe to the stage this config was resolved for (None = the base config).
    stage: Optional[str] = None
    output_dir: str = "runs/viq"
    seed: int = 0


class InitSection(Section):
    """Where the student's weights start (no ckpt and no stage: random initialisation)."""

    ckpt: Optional[str] = None
    #: auto | siglip2_openclip (visual.trunk.*, pos grid 24 -> 128) | reference (vision_tower.pth) | viq
    format: Literal["auto", "siglip2_openclip", "reference", "viq"] = "auto"
    #: start from another stage of this recipe: its directory run.output_dir/<stage>.
    stage: Optional[str] = None
    #: tensors whose shape differs from the checkpoint (e.g. quantizer projections 2-1 -> 2-2) are
    #: re-initialised and reported instead of failing the load.
    reinit_mismatched: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.ckpt and self.stage:
            raise ValueError("set init.ckpt or init.stage, not both")
        return self


class FreezeSection(Section):
    """Parts of the student kept fixed; everything not named here trains (run.task tokenizer)."""

    vit: bool = False
    #: every ViT MLP and LayerNorm (attention-only tuning; the reference's "genli stage1").
    vit_mlp_and_norm: bool = False
    #: the student's final norm + MAP attention-pool head (only the distillation loss uses it).
    attn_pool: bool = False
    #: the whole head (the embedder path too).
    head: bool = False
    #: only the head's blocks before the slot expansion.
    head_pre_blocks: bool = False


class QuantizerSection(Section):
    """What quantizes the head's output in training: fsq (the codes, model.head.levels), or for the
    stage 2-1 proximal bottleneck simvq / passthrough, which replace FSQ between two projections."""

    type: Literal["fsq", "simvq", "passthrough"] = "fsq"
    #: simvq only.
    codebook_size: Optional[PositiveInt] = None
    #: simvq / passthrough width between project_in and project_out (fsq: len(model.head.levels)).
    bottleneck_dim: Optional[PositiveInt] = None
    #: simvq / passthrough constraint; passthrough must state it (l_infinite = hypercube surface).
    limit: Optional[Literal["none", "l2", "l_infinite", "tanh"]] = None

    @model_validator(mode="after")
    def _check(self):
        t = self.type
        if t == "fsq":
            for name in ("limit", "bottleneck_dim", "codebook_size"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to fsq (its bound and width come from "
                                     "model.head.levels); leave it out")
            return self
        if self.bottleneck_dim is None:
            raise ValueError(f"type {t} needs bottleneck_dim (the reference used 32, 128, 256 or 512)")
        if t == "passthrough":
            if self.limit is None:
                raise ValueError("type passthrough needs a limit: none, l2, l_infinite or tanh")
            if self.codebook_size is not None:
                raise ValueError("codebook_size does not apply to passthrough; leave it out")
        if t == "simvq" and self.codebook_size is None:
            raise ValueError("type simvq needs codebook_size (the reference used 32768)")
        return self


class TeacherSection(Section):
    """The frozen fixed-resolution teacher whose pooled feature the student is distilled towards."""

    enabled: bool = True
    #: siglip2: an open_clip SigLIP2 checkpoint; viq: a ViQ encoder (stage-1 output) as teacher.
    kind: Literal["siglip2", "viq"] = "siglip2"
    #: None = a frozen copy of the student's initial weights (tiny runs, no downloads).
    ckpt: Optional[str] = None
    #: None = the student's architecture.
    arch: Optional[Arch] = None
    #: every image is resized (aspect not kept) to this square side for the teacher.
    input_resolution: PositiveInt = 384
    feature: Literal["map_pool"] = "map_pool"

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and self.kind == "viq" and not self.ckpt:
            raise ValueError("teacher kind viq needs ckpt (a viq weights directory or stage-1 checkpoint)")
        return self


class LossTerm(Section):
    enabled: bool = False
    weight: NonNegativeFloat = 1.0


class GanLoss(LossTerm):
    weight: NonNegativeFloat = 0.1
    #: the discriminator joins after this many optimizer steps.
    start_step: NonNegativeInt = 0
    loss: Literal["hinge", "non_saturating"] = "hinge"
    #: scale the generator term by ||grad rec|| / ||grad gan|| at the last decoder layer (VQGAN).
    adaptive: bool = True


class RepaLoss(LossTerm):
    weight: NonNegativeFloat = 0.5
    #: frozen representation encoder the decoder's features are aligned to (e.g. DINOv2).
    encoder: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and not self.encoder:
            raise ValueError("repa needs encoder (the frozen feature encoder to align to, e.g. a DINOv2 path)")
        return self


class DecoderSection(Section):
    """How the drawer (architecture: model.drawer, model.pixel_decoder) trains: target, VAE, losses."""

    enabled: bool = False
    #: latent: regress the frozen VAE's posterior mean (tokenizer training, losses.rec_latent_mse);
    #: pixel: decode through the VAE and train on pixels (the decoder stage; mse/lpips/kl/gan/repa).
    target: Literal["latent", "pixel"] = "latent"
    #: None = a randomly initialised frozen VAE built from model.drawer.vae (tests and demos only).
    vae_path: Optional[str] = None
    train_vae_decoder: bool = False
    mse: LossTerm = Field(default_factory=LossTerm)
    lpips: LossTerm = Field(default_factory=LossTerm)
    kl: LossTerm = Field(default_factory=lambda: LossTerm(weight=1e-6))
    gan: GanLoss = Field(default_factory=GanLoss)
    repa: RepaLoss = Field(default_factory=RepaLoss)

    @model_validator(mode="after")
    def _check(self):
        pixel_terms = [n for n in ("mse", "lpips", "kl", "gan", "repa") if getattr(self, n).enabled]
        if self.target == "latent" and pixel_terms:
            raise ValueError(f"{', '.join(pixel_terms)} need target: pixel (the latent target uses "
                             "losses.rec_latent_mse)")
        if self.enabled and self.target == "pixel" and not {"mse", "lpips", "gan"} & set(pixel_terms):
            raise ValueError("target pixel needs at least one of mse, lpips or gan enabled")
        if self.train_vae_decoder and self.target != "pixel":
            raise ValueError("train_vae_decoder needs target: pixel (nothing back-propagates through "
                             "the VAE otherwise)")
        return self


class ClsDistill(Section):
    enabled: bool = True
    weight: NonNegativeFloat = 10.0
    #: head: pool the head's output (x_low); vit: pool the raw ViT output (required without a head).
    source: Literal["head", "vit"] = "head"
    #: leave images larger than max_res^2 pixels out of this loss (None = all images).
    max_res: Optional[PositiveInt] = None


class LossesSection(Section):
    """Weights of the tokenizer-training losses; 0 turns a term off."""

    lm_ce: NonNegativeFloat = 1.0
    cls_distill: ClsDistill = Field(default_factory=ClsDistill)
    #: MSE(predicted latent, sg[VAE posterior mean]); needs decoder.enabled with target latent.
    rec_latent_mse: NonNegativeFloat = 0.0
    #: sum of the quantizer's auxiliary losses (0 for fsq and the plain passthrough limits).
    commit: NonNegativeFloat = 1.0
    #: MSE(sg LN(ViT feature), head output before the affine).
    feat_rec: NonNegativeFloat = 0.0


class TinyLLM(Section):
    """An in-code Qwen2 config for CPU runs; the vocabulary comes from the data's tokenizer."""

    hidden_size: PositiveInt = 64
    layers: PositiveInt = 2
    heads: PositiveInt = 4
    kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
        return self

    def qwen2_kwargs(self, vocab_size: int, max_length: int) -> dict[str, Any]:
        """Keyword arguments for ``transformers.Qwen2Config``."""
        return dict(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, max_position_embeddings=max_length,
                    tie_word_embeddings=True)


class LoraSection(Section):
    enabled: bool = True
    r: PositiveInt = 64
    alpha: PositiveFloat = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    dora: bool = True
    targets: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class ProjectorSection(Section):
    #: oryx_mlp_v2: Linear, 2x2 normalised pooling, GELU, Linear, newline/begin/end vectors.
    type: Literal["oryx_mlp_v2", "mlp"] = "oryx_mlp_v2"
    pool: Literal["1x", "2x"] = "2x"
    trainable: bool = True


class LLMSection(Section):
    """The language model the tokenizer is trained inside (or the MLLM trained on offline codes)."""

    name_or_path: Optional[str] = None
    tiny: Optional[TinyLLM] = None
    #: HF tokenizer path or a viq WordTokenizer JSON; None = the model's own, or (tiny) built from the data.
    tokenizer: Optional[str] = None
    #: qwen2: <|im_start|>role ... <|im_end|>; plain: <user>/<assistant> markers for word tokenizers.
    template: Literal["qwen2", "plain"] = "qwen2"
    max_length: PositiveInt = 4096
    #: full fine-tuning of the base LLM (tiny runs); mutually exclusive with LoRA.
    trainable: bool = False
    lora: LoraSection = Field(default_factory=LoraSection)
    projector: ProjectorSection = Field(default_factory=ProjectorSection)
    #: mllm_offline attention over packed rows: flash_attention_2 (packed boundaries), varlen_sdpa (SDPA
    #: per packed sample, no cross-row mask), sdpa (one block-diagonal mask over the packed rows: the
    #: slow baseline); auto = flash_attention_2 where flash-attn and a GPU are there, else varlen_sdpa.
    attention: Literal["auto", "flash_attention_2", "varlen_sdpa", "sdpa"] = "auto"
    #: mllm_offline: an earlier offline run (its folder or model.safetensors) whose projector and
    #: LoRA / LLM tensors this run starts from (LLaVA pretrain -> finetune as two recipes).
    init_from: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("set exactly one of llm.name_or_path (a Qwen2.5 checkpoint) or llm.tiny")
        if self.trainable and self.lora.enabled:
            raise ValueError("llm.trainable (full fine-tuning) and llm.lora.enabled exclude each other")
        return self


class ResizeSection(Section):
    """Area-keeping resize used when a sample has no ``resize``: area ~ base^2, sides multiple of patch."""

    base: PositiveInt = 896
    patch: PositiveInt = 32


class DataSection(Section):
    path: str
    val_path: Optional[str] = None
    #: image paths are resolved against this, else against the data file's folder.
    image_root: Optional[str] = None
    #: the reference defaulted to 896x14, which is not 16-aligned; 32 keeps the 2x2 pooling grids even.
    default_resize: ResizeSection = Field(default_factory=ResizeSection)
    #: mllm_offline: a viq code store whose rows replace the images (looked up by img_path).
    code_store: Optional[str] = None
    num_workers: NonNegativeInt = 4
    micro_batch_size: PositiveInt = 1
    #: token (ViT patch) budget per micro-batch; when set, batches are sized by it, not by count.
    max_tokens_per_batch: Optional[PositiveInt] = None
    shuffle: bool = True
    #: keep only this leading fraction of the samples.
    sample_fraction: Optional[float] = Field(None, gt=0, le=1)
    #: fail the run when more than this share of samples is bad (bad ones are skipped and reported).
    max_bad_fraction: float = Field(0.01, ge=0, le=1)

    @field_validator("path", "val_path")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not v.endswith((".json", ".jsonl")):
            raise ValueError(f"{v!r} must be a .json (list) or .jsonl file")
        return v


class ScheduleSection(Section):
    """Linear warmup, then cosine down to min_lr_ratio * lr."""

    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1)
    warmup_steps: Optional[NonNegativeInt] = None
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        return self

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return math.ceil((self.warmup_ratio or 0.0) * total_steps)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of optim.lr at optimizer step ``step`` (0-based), as the reference computes it."""
        w = self.warmup_for(total_steps)
        if step < w:
            return step / w
        p = min(1.0, (step - w) / max(1, total_steps - w))
        r = self.min_lr_ratio
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


class OptimSection(Section):
    """AdamW; weight decay off for biases and norms."""

    #: adamw, or sgd (plain, no momentum: what the accumulation-equivalence tests compare).
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    max_steps: Optional[PositiveInt] = None
    epochs: Optional[PositiveFloat] = None
    grad_accum: PositiveInt = 1
    #: None = no clipping (the reference's effective setting).
    grad_clip: Optional[PositiveFloat] = None

    @model_validator(mode="after")
    def _check(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of optim.max_steps or optim.epochs")
        return self


class RuntimeSection(Section):
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    tf32: bool = True
    #: DeepSpeed ZeRO stage through accelerate; None = plain DDP (or a single process).
    deepspeed_zero: Optional[Literal[1, 2, 3]] = None
    #: FSDP2 through accelerate (GPUs; the 7B-class LLM stages); excludes deepspeed_zero.
    fsdp: bool = False
    #: activation checkpointing of the ViT, head, adapter and LLM blocks.
    gradient_checkpointing: bool = True
    save_every: PositiveInt = 1000
    keep_last: PositiveInt = 1
    log_every: PositiveInt = 10
    eval_every: Optional[PositiveInt] = None
    #: accelerate trackers (``log_with``), each used when installed: tensorboard (<out>/tensorboard), wandb, mlflow.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    #: continue from the latest checkpoint in the run's directory.
    resume: bool = False
