"""The recipe schema: every training knob is a typed field of one section.

The architecture is not restated here: ``model:`` is viq.config.ViQConfig itself, what the exported
``config.json`` holds; the other sections say how it trains. A typo is an error that names the dotted
key and the nearest valid name; options the model cannot honour are rejected, never ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, field_validator, model_validator)

from viq.config import ViQConfig


Arch = Literal["giant", "so400m", "tiny"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- sections ---------------------------------------------------------------------------------


class RunSection(_Section):
    """What the run is and where it writes."""

    name: str = "viq"
    #: tokenizer: ViT + head inside the MLLM (stages 1, 2-1, 2-2, single stage);
    #: decoder: the pixel-decoder stage on frozen codes; mllm_offline: an MLLM trained on a code store.
    task: Literal["tokenizer", "decoder", "mllm_offline"] = "tokenizer"
    #: set by load_recipe to the stage this config was resolved for (None = the base config).
    stage: Optional[str] = None
    output_dir: str = "runs/viq"
    seed: int = 0


class InitSection(_Section):
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


class FreezeSection(_Section):
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


class QuantizerSection(_Section):
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


class TeacherSection(_Section):
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


class LossTerm(_Section):
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


class DecoderSection(_Section):
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


class ClsDistill(_Section):
    enabled: bool = True
    weight: NonNegativeFloat = 10.0
    #: head: pool the head's output (x_low); vit: pool the raw ViT output (required without a head).
    source: Literal["head", "vit"] = "head"
    #: leave images larger than max_res^2 pixels out of this loss (None = all images).
    max_res: Optional[PositiveInt] = None


class LossesSection(_Section):
    """Weights of the tokenizer-training losses; 0 turns a term off."""

    lm_ce: NonNegativeFloat = 1.0
    cls_distill: ClsDistill = Field(default_factory=ClsDistill)
    #: MSE(predicted latent, sg[VAE posterior mean]); needs decoder.enabled with target latent.
    rec_latent_mse: NonNegativeFloat = 0.0
    #: sum of the quantizer's auxiliary losses (0 for fsq and the plain passthrough limits).
    commit: NonNegativeFloat = 1.0
    #: MSE(sg LN(ViT feature), head output before the affine).
    feat_rec: NonNegativeFloat = 0.0


class TinyLLM(_Section):
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


class LoraSection(_Section):
    enabled: bool = True
    r: PositiveInt = 64
    alpha: PositiveFloat = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    dora: bool = True
    targets: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class ProjectorSection(_Section):
    #: oryx_mlp_v2: Linear, 2x2 normalised pooling, GELU, Linear, newline/begin/end vectors.
    type: Literal["oryx_mlp_v2", "mlp"] = "oryx_mlp_v2"
    pool: Literal["1x", "2x"] = "2x"
    trainable: bool = True


class LLMSection(_Section):
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


class ResizeSection(_Section):
    """Area-keeping resize used when a sample has no ``resize``: area ~ base^2, sides multiple of patch."""

    base: PositiveInt = 896
    patch: PositiveInt = 32


class DataSection(_Section):
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


class ScheduleSection(_Section):
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


class OptimSection(_Section):
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


class RuntimeSection(_Section):
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


class Recipe(_Section):
    """A resolved recipe: everything one training run needs."""

    #: variables for ``${name}`` in any string of the recipe (no environment variables).
    paths: dict[str, str] = Field(default_factory=dict)
    run: RunSection = Field(default_factory=RunSection)
    #: the architecture: a viq.config.ViQConfig, what the exported config.json stores (``arch`` names a
    #: preset the other keys override; model.name defaults to run.name).
    model: ViQConfig = Field(default_factory=ViQConfig)
    init: InitSection = Field(default_factory=InitSection)
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    #: null: no head and no quantizer (stage 1: the ViT's output feeds the LLM; model.head waits for 2-1).
    quantizer: Optional[QuantizerSection] = Field(default_factory=QuantizerSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    decoder: DecoderSection = Field(default_factory=DecoderSection)
    losses: LossesSection = Field(default_factory=LossesSection)
    llm: Optional[LLMSection] = None
    data: DataSection
    optim: OptimSection = Field(default_factory=lambda: OptimSection(epochs=1))
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @model_validator(mode="before")
    @classmethod
    def _model_name(cls, data):
        """The exported model is named after the run unless model.name says otherwise."""
        if isinstance(data, dict) and isinstance(data.get("model", {}), dict) and "name" not in data.get("model", {}):
            run = data.get("run") if isinstance(data.get("run"), dict) else {}
            data = {**data, "model": {**data.get("model", {}), "name": run.get("name", RunSection().name)}}
        return data

    @model_validator(mode="after")
    def _cross(self):
        problems = []
        L, task = self.losses, self.run.task
        if L.lm_ce > 0 and self.llm is None:
            problems.append("losses.lm_ce > 0 needs an llm section")
        if L.lm_ce == 0 and self.llm is not None:
            problems.append("llm is set but losses.lm_ce is 0: the LLM would run for nothing (set llm: null)")
        if L.cls_distill.enabled and not self.teacher.enabled:
            problems.append("losses.cls_distill needs teacher.enabled: true")
        if self.teacher.enabled and not L.cls_distill.enabled:
            problems.append("teacher.enabled but losses.cls_distill is off: the teacher would run for nothing")
        if L.rec_latent_mse > 0 and not (self.decoder.enabled and self.decoder.target == "latent"):
            problems.append("losses.rec_latent_mse > 0 needs decoder.enabled: true with decoder.target: latent")
        if self.decoder.enabled and self.decoder.target == "latent" and L.rec_latent_mse == 0:
            problems.append("decoder.target latent trains only through losses.rec_latent_mse, which is 0")
        if self.quantizer is None:
            if self.decoder.enabled:
                problems.append("the decoder reads the head's output: without a head (quantizer: null), set "
                                "decoder.enabled: false")
            if L.cls_distill.enabled and L.cls_distill.source == "head":
                problems.append("without a head (quantizer: null), distil from the ViT: losses.cls_distill.source: vit")
        if task != "tokenizer":
            why = (f"run.task {task} builds on a trained tokenizer (init.ckpt, always frozen; model must describe "
                   "it, which is checked at start)")
            if self.freeze != FreezeSection():
                problems.append(f"freeze is not read: {why}; leave it out")
            if self.quantizer is None or self.quantizer.type != "fsq":
                problems.append(f"quantizer must be fsq: {why}")
            if self.init.stage or self.init.format not in ("auto", "viq"):
                problems.append(f"set init.ckpt to a viq weights directory (init.format auto or viq): {why}")
            if self.teacher.enabled:
                problems.append(f"teacher.enabled must be false: {why}")
        if task == "mllm_offline":
            if not self.data.code_store:
                problems.append("run.task mllm_offline needs data.code_store")
            if self.decoder.enabled:
                problems.append("run.task mllm_offline reads codes, never pixels: set decoder.enabled: false")
        elif self.data.code_store:
            problems.append("data.code_store is only read by run.task mllm_offline")
        if task != "mllm_offline" and self.llm is not None and (self.llm.init_from or self.llm.attention != "auto"):
            problems.append("llm.init_from and llm.attention are read by run.task mllm_offline only")
        # the offline stage packs code-store rows to llm.max_length; the store fixed each image's size
        unread = {"mllm_offline": ("num_workers", "max_tokens_per_batch", "default_resize"),
                  "decoder": ("max_tokens_per_batch",)}.get(task, ())
        defaults = DataSection(path=self.data.path)
        for key in unread:  # a default value is harmless (and a printed recipe lists every key)
            if getattr(self.data, key) != getattr(defaults, key):
                problems.append(f"data.{key} is not read by run.task {task}: remove it")
        if task == "decoder" and not self.decoder.enabled:
            problems.append("run.task decoder needs decoder.enabled: true")
        if task == "decoder" and self.decoder.target != "pixel":
            problems.append("run.task decoder trains on pixels: set decoder.target: pixel")
        if task != "decoder" and self.model.pixel_decoder is not None:
            problems.append("model.pixel_decoder is only trained by run.task decoder; leave it out (null)")
        if self.runtime.fsdp and self.runtime.deepspeed_zero:
            problems.append("runtime.fsdp and runtime.deepspeed_zero exclude each other: pick one")
        if self.runtime.eval_every and not self.data.val_path:
            problems.append("runtime.eval_every needs data.val_path")
        if self.llm and self.llm.projector.pool == "2x" and self.data.default_resize.patch % 32:
            problems.append("llm.projector.pool 2x pools 2x2 patches, so grids must be even: "
                            "data.default_resize.patch must be a multiple of 32")
        if not self._trains_something():
            problems.append("nothing is trainable: every part is frozen or disabled")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _trains_something(self) -> bool:
        f, q, llm = self.freeze, self.quantizer, self.llm
        vision = self.run.task == "tokenizer" and (
            not f.vit or (not f.attn_pool and self.losses.cls_distill.enabled) or (q is not None and not f.head))
        return bool(vision or self.decoder.enabled
                    or (llm and (llm.trainable or llm.lora.enabled or llm.projector.trainable)))

    @property
    def out_dir(self) -> Path:
        """Where this run writes: run.output_dir, plus the stage name when resolved for a stage."""
        root = Path(self.run.output_dir).expanduser()
        return root / self.run.stage if self.run.stage else root

    @property
    def init_path(self) -> Optional[Path]:
        """The checkpoint (file or directory) the student starts from, if any."""
        if self.init.stage:
            return Path(self.run.output_dir).expanduser() / self.init.stage
        return Path(self.init.ckpt).expanduser() if self.init.ckpt else None

    def to_yaml(self) -> str:
        """The resolved recipe as YAML; loading it back gives an equal Recipe."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None,
                              allow_unicode=True, width=100)
