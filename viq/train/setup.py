"""Run setup shared by every stage: the accelerator, seeds, the output folder, data files, tokenizer.

``viq.train.build`` assembles models from a recipe; ``viq.train.run`` dispatches to a stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from viq.data.conversations import SampleSet, WordTokenizer, load_samples, sample_texts
from viq.errors import ConfigError, WeightsError

log = logging.getLogger("viq.train")


# ---- accelerate -----------------------------------------------------------------------------------


#: accelerate tracker name -> the module it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_accelerator(recipe, out_dir: Optional[Path] = None):
    """DDP (or one process), DeepSpeed ZeRO or FSDP2 as ``runtime`` says; trackers that are installed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    rt, optim = recipe.runtime, recipe.optim
    cuda = torch.cuda.is_available()
    if rt.precision == "fp16" and not cuda:
        raise ConfigError("runtime.precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    plugin = fsdp = None
    if rt.deepspeed_zero:
        if not cuda:
            raise ConfigError("runtime.deepspeed_zero needs GPUs; set it to null on CPU")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("runtime.deepspeed_zero needs DeepSpeed: pip install 'viq[deepspeed]' "
                              "(or set runtime.deepspeed_zero: null for plain DDP)")
        plugin = deepspeed_plugin(recipe)
    if rt.fsdp:
        if not cuda:
            raise ConfigError("runtime.fsdp needs GPUs; set it to false on CPU")
        fsdp = fsdp_plugin(recipe)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = rt.tf32
        torch.backends.cudnn.allow_tf32 = rt.tf32
    log_with = []
    for name in rt.trackers:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            log.warning("runtime.trackers names %s, which is not installed (pip install %s): not logging to it",
                        name, TRACKERS[name])
        else:
            log_with.append(name)
    project = None
    if out_dir is not None:
        project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "tensorboard"))
    acc = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[rt.precision],
                      gradient_accumulation_steps=optim.grad_accum, deepspeed_plugin=plugin, fsdp_plugin=fsdp,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], cpu=not cuda,
                      log_with=log_with or None, project_config=project)
    if log_with:
        acc.init_trackers(recipe.run.name + (f"-{recipe.run.stage}" if recipe.run.stage else ""),
                          config=tracker_config(recipe))
    return acc


def tracker_config(recipe) -> dict:
    """The recipe as flat scalars (what every tracker accepts as hyper-parameters)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                out[f"{prefix}{k}"] = v
            else:
                out[f"{prefix}{k}"] = str(v)

    walk(recipe.model_dump(mode="json"), "")
    return out


def fsdp_plugin(recipe):
    """FSDP2 through accelerate for the LLM stages: full sharding, the stage's model wrapped whole."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)


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


def check_data_file(path: str, key: str, recipe=None) -> None:
    """A missing data file: one line naming it, what it was resolved against, and what makes it."""
    if Path(path).expanduser().is_file():
        return
    against = ""
    if recipe is not None and recipe.paths.get("data"):
        against = f" (resolved against paths.data={recipe.paths['data']})"
    raise ConfigError(f"data.{key} {path} does not exist{against}; make the tiny synthetic set with "
                      f"`viqctl shapes --out DIR` and pass paths.data=DIR, or point data.{key} at your JSONL")


def read_data(path: str, image_root: Optional[str], fraction: Optional[float], max_bad: float, what: str,
              recipe=None, check_files: bool = True) -> SampleSet:
    """Checked samples; every bad one is reported; too many bad ones stop the run."""
    check_data_file(path, "path" if what == "train" else "val_path", recipe)
    samples = load_samples(path, image_root=image_root, check_files=check_files)
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


def eos_id(tokenizer, template: str) -> Optional[int]:
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.eos_id
    if template == "qwen2":
        tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            return tid
    return getattr(tokenizer, "eos_token_id", None)


# ---- the run ----------------------------------------------------------------------------------------


def recipe_fingerprint(recipe) -> str:
    d = recipe.model_dump(mode="json")
    d.get("runtime", {}).pop("resume", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def start_run(recipe, resume: Optional[bool]):
    """What every task starts with: the accelerator, per-rank seeds, the output folder with the recipe."""
    resume = recipe.runtime.resume if resume is None else resume
    acc = make_accelerator(recipe, recipe.out_dir)
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
    """``init.ckpt`` as the viq weights directory a decoder / MLLM stage builds on."""
    if recipe.init.ckpt is None or recipe.init.stage:
        raise ConfigError(f"run.task {recipe.run.task} needs init.ckpt: {why}")
    init = Path(recipe.init.ckpt).expanduser()
    if not (init / "config.json").is_file() and not any(init.glob("model_viq_fsq_*.pth")):
        raise WeightsError(f"init.ckpt {init}: neither a viq weights directory (config.json) nor the "
                           "published layout (model_viq_fsq_<size>.pth); name a trained ViQ, e.g. viq-16k")
    return init


def check_architecture(recipe, found, source: Path) -> None:
    """``model:`` must describe the frozen tokenizer a decoder / MLLM stage builds on (its config.json),
    so that the recipe states what it trains against and a wrong ``init.ckpt`` fails at once."""
    want = recipe.model.model_dump(include={"vit", "head", "drawer"}, exclude={"drawer": {"vae"}})
    have = found.model_dump(include={"vit", "head", "drawer"}, exclude={"drawer": {"vae"}})
    diffs = [f"model.{key}: recipe {a!r}, checkpoint {b!r}" for key, a, b in _leaf_diffs(want, have)]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"init.ckpt {source} is not the model this recipe describes ({shown}); set model "
                          "to the tokenizer's architecture (its config.json) or point init.ckpt at the right one")


def _leaf_diffs(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            yield from _leaf_diffs(a[k], b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip("."), a, b
