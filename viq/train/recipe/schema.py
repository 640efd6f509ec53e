"""The recipe schema: one typed Recipe made of the sections in sections.py, plus the rules that span them.

The architecture is not restated here: ``model:`` is viq.config.ViQConfig itself, what the exported
``config.json`` holds; the other sections say how it trains. A typo is an error that names the dotted
key and the nearest valid name; options the model cannot honour are rejected, never ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, model_validator

from viq.config import ViQConfig
from viq.train.recipe.sections import (DataSection, DecoderSection, FreezeSection, InitSection, LLMSection,
                                       LossesSection, OptimSection, QuantizerSection, RunSection, RuntimeSection,
                                       TeacherSection, Section)

class Recipe(Section):
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
        if not isinstance(data, dict):
            return data
        model, run = data.get("model", {}), data.get("run", {})
        if isinstance(model, dict) and "name" not in model:
            name = run.get("name", RunSection().name) if isinstance(run, dict) else RunSection().name
            data = {**data, "model": {**model, "name": name}}
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
