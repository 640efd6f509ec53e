"""``train(recipe)``: a resolved recipe -> the assembled parts -> the loop -> files and metrics.

What a run writes under ``recipe.out_dir`` (``run.output_dir[/<stage>]``):

* ``recipe.yaml``            the resolved recipe;
* ``checkpoints/step-N/``    atomic training checkpoints (``viq.train.checkpoint``), for ``resume``;
* ``model.safetensors``      the final trained tensors in training names (what the next stage loads);
* ``training.json``          what they are (stage, quantizer, steps, tokenizer, vocabulary size);
* ``tokenizer.json``         the word tokenizer of tiny runs;
* ``viq/``                   FSQ runs: the tokenizer in viq's weights format (``save_viq``),
                             loadable by ``viq.load_tokenizer`` and ``viqctl``;
* ``metrics.json``           held-out metrics at the start and the end, training losses, skips;
* ``init-report.json``       which tensors came from the starting checkpoint, which were
                             re-initialised on purpose and which started fresh.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from viq.config import VAEConfig, ViQConfig, preset_config
from viq.data.conversations import Resize, SampleSet, WordTokenizer, load_samples, sample_texts
from viq.errors import ConfigError, WeightsError
from viq.mllm.collate import BatchPlan, ConversationDataset, placeholder_id
from viq.mllm.model import MLLM, Projector, build_llm
from viq.model.student import Student
from viq.quant import build_quantizer
from viq.train import checkpoint as ckpt
from viq.train.evaluate import EvalSpec
from viq.train.loop import LoopConfig, Trainer
from viq.train.model import LossPlan, TrainModel, trained_state
from viq.train.optim import total_steps
from viq.train.progress import ProgressFn
from viq.train.targets import FrozenTargets
from viq.train.teacher import build_teacher, trunk_tensors, trunk_to_vit
from viq.train.weight_paths import resolve_recipe_weights
from viq.weights.io import read_tensors, write_json, write_safetensors

log = logging.getLogger("viq.train")

STATE_FILE = "model.safetensors"
INFO_FILE = "training.json"


# ---- results ------------------------------------------------------------------------------------


@dataclass
class InitReport:
    """How the starting weights were applied (stage hand-over, open_clip, reference, viq)."""

    source: str
    format: str
    loaded: int = 0
    #: shape changed between checkpoint and model: re-initialised on purpose (model.reinit_mismatched)
    reinitialised: list[str] = field(default_factory=list)
    #: in the model, absent from the checkpoint: start fresh
    fresh: list[str] = field(default_factory=list)
    #: in the checkpoint, absent from the model: dropped
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.source} ({self.format}): {self.loaded} tensors loaded, {len(self.reinitialised)} "
                f"re-initialised (shape changed), {len(self.fresh)} fresh, {len(self.dropped)} dropped")


@dataclass
class TrainResult:
    out_dir: Path
    stage: Optional[str]
    steps: int
    metrics: dict
    metrics_path: Path
    state_path: Path  # model.safetensors (final trained tensors)
    viq_dir: Optional[Path]  # viq weights directory (FSQ runs only)
    checkpoint: Optional[Path]  # the last checkpoint written
    resumed_from: Optional[Path]
    init: Optional[InitReport]
    history: list[dict]  # per optimizer step, this process's loss terms and LR
    skipped: list[str]  # "sample <index> (id ...): reason", data file and runtime skips


# ---- accelerate -----------------------------------------------------------------------------------


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    rt, optim = recipe.runtime, recipe.optim
    cuda = torch.cuda.is_available()
    if rt.precision == "fp16" and not cuda:
        raise ConfigError("runtime.precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    plugin = None
    if rt.deepspeed_zero:
        if not cuda:
            raise ConfigError("runtime.deepspeed_zero needs GPUs; set it to null on CPU")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("runtime.deepspeed_zero needs DeepSpeed: pip install 'viq[deepspeed]' "
                              "(or set runtime.deepspeed_zero: null for plain DDP)")
        plugin = deepspeed_plugin(recipe)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = rt.tf32
        torch.backends.cudnn.allow_tf32 = rt.tf32
    return Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[rt.precision],
                       gradient_accumulation_steps=optim.grad_accum, deepspeed_plugin=plugin,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], cpu=not cuda)


def deepspeed_plugin(recipe):
    """ZeRO settings from the recipe. The micro-batch size is set explicitly: the loop prepares no
    DataLoader, from which accelerate would otherwise infer it (and refuse to start)."""
    from accelerate.utils import DeepSpeedPlugin

    rt, optim = recipe.runtime, recipe.optim
    extra = {"gradient_clipping": optim.grad_clip} if optim.grad_clip else {}
    plugin = DeepSpeedPlugin(zero_stage=rt.deepspeed_zero, gradient_accumulation_steps=optim.grad_accum, **extra)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.micro_batch_size
    return plugin


# ---- data and tokenizer ---------------------------------------------------------------------------


def read_data(path: str, image_root: Optional[str], fraction: Optional[float], max_bad: float, what: str) -> SampleSet:
    """Checked samples; every bad one is reported; too many bad ones stop the run."""
    samples = load_samples(path, image_root=image_root)
    for bad in samples.bad[:20]:
        log.warning("%s: skipping %s", what, bad)
    if len(samples.bad) > 20:
        log.warning("%s: ... and %d more bad samples", what, len(samples.bad) - 20)
    if samples.bad_fraction > max_bad:
        raise ConfigError(f"{path}: {len(samples.bad)} of {samples.total} samples are bad "
                          f"({samples.bad_fraction:.1%} > data.max_bad_fraction {max_bad:.1%}); first: {samples.bad[0]}")
    if fraction is not None:
        samples.samples = samples.samples[: max(1, int(len(samples.samples) * fraction))]
    if not samples.samples:
        raise ConfigError(f"{path}: no usable sample")
    return samples


def make_tokenizer(recipe, texts_from: list[SampleSet], look_in: list[Path]):
    """The recipe's tokenizer: a saved word tokenizer (a previous stage's or this run's), one built
    from the data (tiny runs), or a Hugging Face tokenizer."""
    llm = recipe.llm
    if llm.tokenizer and llm.tokenizer.endswith(".json"):
        return WordTokenizer.load(llm.tokenizer)
    if llm.tokenizer is None and llm.tiny is not None:
        for folder in look_in:
            if (folder / "tokenizer.json").is_file():
                return WordTokenizer.load(folder / "tokenizer.json")
        from viq.data.conversations import TEMPLATES

        t = TEMPLATES[llm.template]
        extra = [t.system, t.user, t.assistant, t.end]
        return WordTokenizer.from_texts([*extra, *(x for s in texts_from for x in sample_texts(s))])
    from transformers import AutoTokenizer

    src = llm.tokenizer or llm.name_or_path
    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer {src}: {exc}") from None


def _eos_id(tokenizer, template: str) -> Optional[int]:
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.eos_id
    if template == "qwen2":
        tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            return tid
    return getattr(tokenizer, "eos_token_id", None)


# ---- model assembly -------------------------------------------------------------------------------


def build_target_vae(recipe, cfg: ViQConfig, seed: int) -> tuple[nn.Module, ViQConfig]:
    """The frozen Qwen-Image VAE (encoder included) whose posterior mean the drawer regresses.

    Without ``decoder.vae_path`` a random VAE of ``model.drawer.vae``'s shape (tests, tiny runs).
    Returns the VAE and the config with its architecture (what the exported drawer must build).
    """
    from diffusers import AutoencoderKLQwenImage

    path = recipe.decoder.vae_path
    if path:
        try:
            vae = AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"decoder.vae_path {path}: cannot load AutoencoderKLQwenImage ({exc})") from None
        fields = VAEConfig.model_fields
        found = VAEConfig(**{k: vae.config[k] for k in fields if k in vae.config and vae.config[k] is not None})
        if found != cfg.drawer.vae:
            log.info("the VAE at %s differs from model.drawer.vae; the drawer follows the VAE", path)
            cfg = cfg.model_copy(deep=True)
            cfg.drawer.vae = found
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(**cfg.drawer.vae.model_dump(exclude_none=True))
    vae.eval().requires_grad_(False)
    return vae, cfg


def build_student(recipe, cfg: ViQConfig) -> Student:
    head = recipe.head
    quantizer = None
    if head is not None:
        q = head.quantizer
        quantizer = build_quantizer(q.type, levels=q.levels, dim=q.bottleneck_dim, codebook_size=q.codebook_size,
                                    limit=q.limit, seed=recipe.run.seed + 4)
    return Student(cfg, quantizer, head=head is not None, pool=recipe.losses.cls_distill.enabled,
                   drawer=recipe.decoder.enabled, seed=recipe.run.seed)


def build_mllm(recipe, cfg: ViQConfig, vocab_size: int) -> Optional[MLLM]:
    if recipe.llm is None:
        return None
    llm = build_llm(recipe.llm, vocab_size=vocab_size, seed=recipe.run.seed + 5)
    hidden = llm.get_input_embeddings().embedding_dim
    p = recipe.llm.projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.run.seed + 6)
        projector = Projector(cfg.vit.width, hidden, p.type, p.pool)
    projector.requires_grad_(p.trainable)
    return MLLM(llm, projector, recipe.llm.max_length)


def _arch_vit(recipe):
    arch = recipe.teacher.arch
    return None if arch is None else preset_config(arch).vit


# ---- starting weights -----------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """auto: a run directory (training state), a viq directory, an open_clip trunk, or reference keys."""
    from viq.weights import keymaps

    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return "training"
        return "viq"  # viq's layout or the published converted_<size>/ folder: load_state reads both
    keys = list(read_tensors(path))
    if any(k.startswith(keymaps.TRAIN_PREFIX) or k.startswith("fusion_block.") for k in keys):
        return "reference"
    if any(k.startswith("visual.trunk.") for k in keys) or ("pos_embed" in keys and any(
            k.startswith("blocks.") for k in keys)):
        return "siglip2_openclip"
    return "reference"


def init_tensors(recipe, path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The starting checkpoint as tensors in TrainModel names; (tensors, format, notes)."""
    from viq.weights import keymaps
    from viq.weights.convert import adapt_shapes, is_training_layout, strip_training_layout
    from viq.weights.formats import load_state, map_reference

    fmt = "training" if recipe.model.init_stage else recipe.model.init_format
    if not path.exists():
        hint = " (run that stage first)" if recipe.model.init_stage else ""
        raise WeightsError(f"the starting checkpoint {path} does not exist{hint}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "training":
        f = path / STATE_FILE if path.is_dir() else path
        return read_tensors(f), fmt, []
    cfg = recipe.viq_config()
    if fmt == "siglip2_openclip":
        state, notes = trunk_to_vit(trunk_tensors(read_tensors(path)), cfg.vit, True)
        return {f"student.vit.{k}": v for k, v in state.items()}, fmt, notes
    if fmt == "reference":
        raw = read_tensors(path)
        dropped_note = []
        if is_training_layout(raw):
            raw, dropped, _ = strip_training_layout(raw, None)
            dropped_note = [f"dropped {len(v)} {g} tensors" for g, v in dropped.items()]
        mapped, dropped2, unknown = map_reference(raw, keymaps.ENCODER_FILE, str(path))
        notes = dropped_note + [f"dropped {len(v)} {g} tensors" for g, v in dropped2.items()]
        if unknown:
            notes.append(f"{len(unknown)} keys with no viq name, e.g. {unknown[0]}")
        notes += adapt_shapes(mapped, cfg)
        return {f"student.{k}": v for k, v in mapped.items()}, fmt, notes
    if fmt == "viq":
        try:
            _, state, report = load_state(path)
        except WeightsError:
            _, state, report = load_state(path, parts=("encoder", "decoder"))
        return {f"student.{k}": v for k, v in state.items()}, fmt, list(report.notes)
    raise ConfigError(f"unknown model.init_format {fmt!r}")


def apply_init(model: TrainModel, tensors: dict[str, torch.Tensor], reinit_mismatched: bool, source: str, fmt: str,
               notes: list[str]) -> InitReport:
    """Copy matching tensors into the model; shape changes only with ``reinit_mismatched``, reported."""
    own = model.state_dict()
    report = InitReport(source, fmt, notes=list(notes))
    mismatched = []
    with torch.no_grad():
        for k, v in tensors.items():
            if k not in own:
                report.dropped.append(k)
            elif tuple(own[k].shape) != tuple(v.shape):
                mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
            else:
                own[k].copy_(v.to(own[k].dtype))
                report.loaded += 1
    if mismatched and not reinit_mismatched:
        raise WeightsError(f"{source}: {len(mismatched)} tensors change shape ({', '.join(mismatched[:4])}); set "
                           "model.reinit_mismatched: true to re-initialise them on purpose")
    report.reinitialised = mismatched
    report.fresh = [k for k in trained_state(model) if k not in tensors]
    return report


def _grouped(keys: list[str], depth: int = 3) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        g = ".".join(k.split(" ")[0].split(".")[:depth])
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items())


# ---- the entry point ------------------------------------------------------------------------------


def recipe_fingerprint(recipe) -> str:
    d = recipe.model_dump(mode="json")
    d.get("runtime", {}).pop("resume", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def start_run(recipe, resume: Optional[bool]):
    """What every task starts with: the accelerator, per-rank seeds, the output folder with the recipe."""
    resume = recipe.runtime.resume if resume is None else resume
    acc = make_accelerator(recipe)
    seed = recipe.run.seed
    torch.manual_seed(seed + acc.process_index)
    random.seed(seed + acc.process_index)
    np.random.seed(seed + acc.process_index)
    out = recipe.out_dir
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    return acc, resume, out


def frozen_tokenizer_dir(recipe, why: str) -> Path:
    """``model.init_ckpt`` as the viq weights directory a decoder / MLLM stage builds on."""
    if recipe.model.init_ckpt is None or recipe.model.init_stage:
        raise ConfigError(f"run.task {recipe.run.task} needs model.init_ckpt: {why}")
    init = Path(recipe.model.init_ckpt).expanduser()
    if not (init / "config.json").is_file() and not any(init.glob("model_viq_fsq_*.pth")):
        raise WeightsError(f"model.init_ckpt {init}: neither a viq weights directory (config.json) nor the "
                           "published layout (model_viq_fsq_<size>.pth); name a trained ViQ, e.g. viq-16k")
    return init


def train(recipe, *, progress: Optional[ProgressFn] = None, resume: Optional[bool] = None,
          eval_limit: Optional[int] = None, eval_at_start: bool = True) -> TrainResult:
    """Train the ViQ tokenizer as ``recipe`` says; returns metrics and where everything was written.

    ``resume`` (default: ``recipe.runtime.resume``) continues from the newest complete checkpoint in
    ``<out_dir>/checkpoints`` (a fresh start when there is none). ``progress`` receives
    ``ProgressEvent``s (start, step, log, eval, save, end) on the main process; ``step`` events also
    on the others, with the sample indices that process read. ``eval_limit`` caps the held-out
    samples evaluated; ``eval_at_start`` also measures the untrained model (the "before" numbers).
    Weights fields may name a `viqctl download` entry (``teacher.ckpt: siglip2-g``): see ``weight_paths``.
    """
    recipe = resolve_recipe_weights(recipe)
    if recipe.run.task == "mllm_offline":  # MLLM on codes from a code store
        from viq.train.offline_stage import train_offline

        return train_offline(recipe, progress=progress, resume=resume, eval_limit=eval_limit)
    if recipe.run.task == "decoder":  # pixel decoder on a frozen tokenizer
        from viq.train.decoder_stage import train_decoder

        return train_decoder(recipe, progress=progress, resume=resume, eval_limit=eval_limit)
    if recipe.run.task != "tokenizer":
        raise ConfigError(f"run.task {recipe.run.task!r} is not implemented")
    if recipe.llm is None:
        raise ConfigError("training without an LLM (llm: null) is not implemented yet: the data path needs a tokenizer")
    acc, resume, out = start_run(recipe, resume)
    seed = recipe.run.seed
    init_dir = recipe.init_path if recipe.model.init_stage else None

    # data
    d = recipe.data
    train_set = read_data(d.path, d.image_root, d.sample_fraction, d.max_bad_fraction, "train")
    val_set = read_data(d.val_path, d.image_root, None, d.max_bad_fraction, "val") if d.val_path else None
    tokenizer = None
    if recipe.llm is not None:
        tokenizer = make_tokenizer(recipe, [s for s in (train_set, val_set) if s is not None],
                                   [p for p in (out if resume else None, init_dir) if p is not None])
        if isinstance(tokenizer, WordTokenizer) and acc.is_main_process:
            # now, so that a resumed run reads the same vocabulary; atomically, other processes may read it
            tokenizer.save(out / ".tokenizer.json.tmp")
            os.replace(out / ".tokenizer.json.tmp", out / "tokenizer.json")

    # model
    cfg = recipe.viq_config()
    vae = None
    if recipe.decoder.enabled:
        vae, cfg = build_target_vae(recipe, cfg, seed + 3)
    student = build_student(recipe, cfg)
    if vae is not None:
        own = student.drawer.vae.state_dict()
        full = vae.state_dict()
        student.drawer.vae.load_state_dict({k: full[k] for k in own})  # the drawer decodes with the same VAE
    teacher = None
    if recipe.teacher.enabled:
        teacher = build_teacher(recipe.teacher, cfg.vit, _arch_vit(recipe), seed)
    mllm = build_mllm(recipe, cfg, len(tokenizer) if tokenizer is not None else 0)
    L = recipe.losses
    pool_from = L.cls_distill.source if L.cls_distill.enabled else None
    plan = LossPlan(weights={"lm_ce": L.lm_ce, "cls_distill": L.cls_distill.weight if L.cls_distill.enabled else 0.0,
                             "rec_latent_mse": L.rec_latent_mse, "commit": L.commit, "feat_rec": L.feat_rec},
                    pool_from=pool_from, draw=recipe.decoder.enabled, feat_rec=L.feat_rec > 0, vit_grad=True)
    model = TrainModel(student, mllm, plan)

    init_report = None
    if recipe.init_path is not None:
        tensors, fmt, notes = init_tensors(recipe, recipe.init_path)
        init_report = apply_init(model, tensors, recipe.model.reinit_mismatched, str(recipe.init_path), fmt, notes)
        if acc.is_main_process:
            log.info("starting weights: %s", init_report.summary())
            if init_report.reinitialised:
                log.info("re-initialised on purpose (shape changed): %s", "; ".join(init_report.reinitialised))
            if init_report.fresh:
                log.info("initialised fresh: %s", _grouped(init_report.fresh))
            write_json(init_report.as_dict(), out / "init-report.json")

    h = recipe.head
    student.set_trainable(vit=recipe.model.trainable, vit_mlp_norm=not recipe.model.freeze_mlp_and_norm,
                          pool=recipe.model.train_attn_pool and L.cls_distill.enabled,
                          head=h is not None and not h.freeze, head_pre_blocks=h is None or not h.freeze_pre_blocks,
                          drawer=recipe.decoder.enabled)
    plan.vit_grad = any(p.requires_grad for n, p in student.vit.named_parameters() if n.startswith(("blocks.", "patch")))
    if recipe.runtime.gradient_checkpointing:
        student.set_grad_checkpointing(True)
        if mllm is not None:
            mllm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if acc.device.type == "cuda" and recipe.runtime.precision == "bf16":
        frozen_dtype = torch.bfloat16  # frozen targets only; trained weights stay fp32 under autocast
    else:
        frozen_dtype = None
    targets = FrozenTargets(teacher, vae, cfg.vit.patch).to("cpu", frozen_dtype)

    # data sets and batch plans
    projector_tokens = mllm.projector.num_tokens if mllm is not None else None
    max_len = recipe.llm.max_length if recipe.llm is not None else 10 ** 9
    resize = Resize(base=d.default_resize.base, patch=d.default_resize.patch)
    tok_id = placeholder_id(tokenizer) if tokenizer is not None else None

    def dataset(samples, name):
        return ConversationDataset(samples.samples, tokenizer, recipe.llm.template if recipe.llm else "plain", resize,
                                   max_len, cfg.vit.patch, projector_tokens, tok_id, name=name)

    train_ds = dataset(train_set, "train")
    counts = None
    if d.max_tokens_per_batch:
        counts = [train_ds.patch_tokens(i) for i in range(len(train_ds))]
    batch_plan = BatchPlan(len(train_ds), d.micro_batch_size, acc.num_processes, acc.process_index, seed,
                           d.shuffle, counts, d.max_tokens_per_batch)
    steps = total_steps(recipe.optim, batch_plan.steps_per_epoch())
    eval_spec = None
    if val_set is not None:
        eval_spec = EvalSpec(dataset(val_set, "val"), d.micro_batch_size, tokenizer, _eos_id(tokenizer, recipe.llm.template),
                             eval_limit)
    rt = recipe.runtime
    loop_cfg = LoopConfig(total_steps=steps, grad_clip=recipe.optim.grad_clip, log_every=rt.log_every,
                          save_every=rt.save_every, keep_last=rt.keep_last, eval_every=rt.eval_every,
                          num_workers=d.num_workers, checkpoint_root=out / "checkpoints",
                          tensorboard_dir=out / "tensorboard" if rt.tensorboard else None,
                          eval_at_start=eval_at_start, patch=cfg.vit.patch, fingerprint=recipe_fingerprint(recipe))
    trainer = Trainer(acc, model, targets, train_ds, batch_plan, loop_cfg, recipe.optim, recipe.optim.schedule,
                      eval_spec, progress)
    if acc.is_main_process:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s%s: %d optimizer steps, %d trainable parameters, %d process(es), %d train samples (%d bad)",
                 recipe.run.name, f" stage {recipe.run.stage}" if recipe.run.stage else "", steps, n_train,
                 acc.num_processes, len(train_set), len(train_set.bad))
    if resume:
        last = ckpt.latest_checkpoint(loop_cfg.checkpoint_root)
        if last is not None:
            trainer.resume(last)
            log.info("resuming from %s (step %d)", last, trainer.step)
        else:
            log.info("resume asked but no checkpoint in %s: starting fresh", loop_cfg.checkpoint_root)
    result = trainer.run()

    # outputs
    final_model = acc.unwrap_model(trainer.model)
    state_path = out / STATE_FILE
    viq_dir = None
    metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "steps": result.steps,
               "elapsed_s": round(result.elapsed_s, 2), "processes": acc.num_processes,
               "train": result.last_log, "eval": result.evals,
               "skipped_samples": result.skipped_count + len(train_set.bad),
               "bad_in_data_file": [str(b) for b in train_set.bad[:100]],
               "skipped_at_load": result.skipped[:100]}
    if val_set is not None and any("attribute_accuracy" in v for v in result.evals.values()):
        from viq.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES

        chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "size": 1 / len(SIZES),
                  "position": 1 / len(POSITIONS)}
        chance["mean"] = sum(chance.values()) / 4
        metrics["attribute_chance"] = chance
    if init_report is not None:
        metrics["init"] = {"source": init_report.source, "loaded": init_report.loaded,
                           "reinitialised": init_report.reinitialised, "fresh": len(init_report.fresh)}
    if acc.is_main_process:
        write_safetensors(trained_state(final_model), state_path, metadata={"format": "viq-training-state"})
        info = {"format": "viq-training-state", "version": 1, "stage": recipe.run.stage,
                "quantizer": student.kind, "codebook_size": student.codebook_size, "steps": result.steps,
                "vocab_size": len(tokenizer) if tokenizer is not None else None,
                "model": cfg.model_dump(mode="json")}
        if student.kind == "fsq":
            from viq.weights.save import save_viq

            viq_dir = out / "viq"
            save_viq(student.viq_state(), cfg, viq_dir,
                     source_info={"kind": "viq-training", "recipe": recipe.run.name, "stage": recipe.run.stage,
                                  "steps": result.steps, "fingerprint": recipe_fingerprint(recipe),
                                  # a random frozen VAE makes the drawer's pictures meaningless: say so
                                  "drawer_vae": recipe.decoder.vae_path or "random"})
            info["viq_dir"] = "viq"
        write_json(info, out / INFO_FILE)
        write_json(metrics, out / "metrics.json")
        log.info("done: %d steps in %.1fs; outputs in %s", result.steps, result.elapsed_s, out)
    elif student.kind == "fsq":
        viq_dir = out / "viq"
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(out, recipe.run.stage, result.steps, metrics, out / "metrics.json", state_path, viq_dir,
                       result.last_checkpoint, result.resumed_from, init_report, result.history,
                       [str(b) for b in train_set.bad] + result.skipped)
