"""The decoder stage (``run.task: decoder``): a pixel decoder trained on a frozen ViQ tokenizer.

    image ─frozen encoder + head (model.init_ckpt, a viq directory)─▶ codes ─frozen embedder─▶ features
      ─trainable PixelDecoder (decoder.pixel)─▶ RGB, compared with the image padded to the patch grid

* Data: every image of the data JSONL (``data.path``), resized as the sample (or data.default_resize)
  says, in [-1, 1], zero-padded (mid grey, as the ViT pads) right/bottom to the patch multiple; the
  images of a micro-batch are packed into one sequence.
* Losses (``decoder.mse|lpips|kl|gan|repa``, each can be off): ``viq.train.decoder_losses.DecoderLoss``.
  The GAN has its own PatchDiscriminator (base width = the pixel decoder's last-stage channels, at
  least 8; 3 layers) and its own AdamW (optim.lr, betas, eps; no weight decay; same schedule); it joins
  at ``gan.start_step``.
* Perceptual nets, from local files only:
    - LPIPS: ``paths.lpips`` when set (``tiny`` = a random stand-in, tests), else
      ``${paths.models}/lpips-vgg16`` (``viq.eval.perceptual.LPIPS_HOWTO`` says what goes there);
    - DINOv2 (REPA): ``decoder.repa.encoder`` (a Hugging Face directory; ``tiny`` = a random stand-in).
* Pixel decoder architecture: ``decoder.pixel`` (None = PixelDecoderConfig's defaults). ``width``
  follows the tokenizer's feature width and ``repa_dim`` the DINOv2 width unless given explicitly.
* Optimizer: AdamW (no decay on biases/norms), warmup + cosine (optim.schedule), grad accumulation
  and clipping, through accelerate (runtime.precision).
* Checkpoints (``viq.train.checkpoint``, atomic) every ``runtime.save_every`` steps and at the end:
  pixel decoder + discriminator tensors, both optimizers (the discriminator's in
  ``disc-optimizer.*``), the schedule, data position, RNG. ``resume`` continues exactly.

Outputs under ``recipe.out_dir``: ``recipe.yaml``, ``checkpoints/``, ``model.safetensors`` (pixel
decoder + discriminator), ``viq/`` (the tokenizer's parts + the trained ``pixel_decoder`` part,
loadable with ``load_tokenizer(..., parts=(..., "pixel_decoder"))``) and ``metrics.json`` with
held-out PSNR (and LPIPS with the loss's LPIPS net) of the pixel decoder against the tokenizer's
VAE path (``reconstruct(codes, "vae")``) on ``data.val_path``.

Single process is what is tested; several processes run through accelerate's DDP wrapping but have
not been exercised here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from viq.config import PixelDecoderConfig
from viq.errors import ConfigError, ViQError, WeightsError
from viq.images import to_pixels
from viq.nn.vit import Packing
from viq.train import checkpoint as ckpt
from viq.train.optim import make_optimizer, make_scheduler, total_steps
from viq.train.progress import MetricsWriter, ProgressEvent, ProgressFn, due, format_metrics

log = logging.getLogger("viq.train.decoder")

TINY = "tiny"
DISC_OPT = "disc-optimizer"


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    index: int  # position in the image list
    source: str
    pixels: Optional[torch.Tensor]  # (3, H', W') padded to the patch multiple, in [-1, 1]
    size: tuple[int, int]  # (H, W) before padding
    error: str = ""


class ImageDataset(torch.utils.data.Dataset):
    """Every image of the samples, resized as the sample (or the default) says, padded to the patch grid."""

    def __init__(self, samples, default_resize, patch: int):
        self.refs = [ref for s in samples for ref in s.images]
        self.default_resize, self.patch = default_resize, patch

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> ImageItem:
        from viq.mllm.collate import _read_image
        from viq.images import DEFAULT_MAX_PIXELS

        ref = self.refs[i]
        try:
            img = _read_image(ref, DEFAULT_MAX_PIXELS)
            size = (ref.resize or self.default_resize).target_size(*img.size)
            if size != img.size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            x = to_pixels(img)
        except (ViQError, OSError, ValueError) as exc:
            return ImageItem(i, ref.source, None, (0, 0), str(exc))
        p = self.patch
        h, w = x.shape[1:]
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return ImageItem(i, ref.source, x, (h, w))


def _as_list(items):
    return list(items)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


# ---- nets -------------------------------------------------------------------------------------------


def load_perceptual(recipe, device):
    """(lpips net or None, dino net or None, notes) as the recipe asks (see the module docstring)."""
    from viq.eval.perceptual import LPIPS_DOWNLOAD_NAME, LPIPS_HOWTO, load_dinov2, load_lpips

    d, notes = recipe.decoder, {}
    lpips = dino = None
    if d.lpips.enabled:
        path = recipe.paths.get("lpips")
        if path is None and recipe.paths.get("models"):
            path = str(Path(recipe.paths["models"]).expanduser() / LPIPS_DOWNLOAD_NAME)
        if path is None:
            raise ConfigError("decoder.lpips is on but no LPIPS weights are named: set paths.lpips (a file or "
                              f"directory: {LPIPS_HOWTO}) or paths.models, or paths.lpips: tiny for a random "
                              "stand-in (tests)")
        lpips = load_lpips(tiny=True) if path == TINY else load_lpips(path)
        notes["lpips"] = path
    if d.repa.enabled:
        enc = d.repa.encoder
        dino = load_dinov2(tiny=True) if enc == TINY else load_dinov2(enc)
        notes["repa_encoder"] = enc
    for net in (lpips, dino):
        if net is not None:
            net.to(device).eval().requires_grad_(False)
    return lpips, dino, notes


def pixel_config(recipe, width: int, patch: int, dino) -> PixelDecoderConfig:
    given = recipe.decoder.pixel
    data = given.model_dump() if given is not None else PixelDecoderConfig().model_dump()
    fields_set = given.model_fields_set if given is not None else set()
    if "width" not in fields_set:
        data["width"] = width
    if "repa_dim" not in fields_set and dino is not None:
        data["repa_dim"] = dino.dim
    cfg = PixelDecoderConfig(**data)
    if cfg.width != width:
        raise ConfigError(f"decoder.pixel.width {cfg.width} differs from the tokenizer's feature width {width}")
    if cfg.patch != patch:
        raise ConfigError(f"decoder.pixel.patch {cfg.patch} differs from the tokenizer's patch {patch}")
    if dino is not None and cfg.repa_dim != dino.dim:
        raise ConfigError(f"decoder.pixel.repa_dim {cfg.repa_dim} differs from the REPA encoder's width {dino.dim}")
    return cfg


def _source_parts(path: Path) -> tuple[str, ...]:
    """The parts of the starting viq directory the output must carry (encoder and decoder at least)."""
    parts = ("encoder", "decoder", "drawer")
    try:
        meta = json.loads((path / "config.json").read_text())
        have = set(meta.get("parts") or {})
        if have:
            parts = tuple(p for p in ("encoder", "pool", "decoder", "drawer") if p in have)
    except (OSError, ValueError):
        pass
    missing = [p for p in ("encoder", "decoder") if p not in parts]
    if missing:
        raise WeightsError(f"{path}: the decoder stage needs a viq directory with the parts {missing}")
    return parts


# ---- the entry point --------------------------------------------------------------------------------


def train_decoder(recipe, progress: Optional[ProgressFn] = None, resume: Optional[bool] = None,
                  eval_limit: Optional[int] = None):
    from viq.data.conversations import Resize
    from viq.mllm.collate import BatchPlan
    from viq.model.discriminator import PatchDiscriminator
    from viq.model.pixel_decoder import PixelDecoder
    from viq.tokenizer import load_tokenizer
    from viq.train.decoder_losses import DecoderLoss, DecoderLossWeights
    from viq.train.run import TrainResult, frozen_tokenizer_dir, read_data, recipe_fingerprint, start_run
    from viq.weights.io import write_json, write_safetensors
    from viq.weights.save import save_viq

    init = frozen_tokenizer_dir(recipe, "a trained tokenizer's viq weights directory")
    acc, resume, out = start_run(recipe, resume)
    dev = acc.device
    seed = recipe.run.seed

    # frozen tokenizer (fp32: its parts are written back unchanged)
    parts = _source_parts(init)
    tok = load_tokenizer(init, parts=parts, device=str(dev), dtype=torch.float32)
    tok.model.eval().requires_grad_(False)
    patch = tok.patch
    width = tok.config.vit.width

    # data
    d = recipe.data
    train_set = read_data(d.path, d.image_root, d.sample_fraction, d.max_bad_fraction, "train")
    val_set = read_data(d.val_path, d.image_root, None, d.max_bad_fraction, "val") if d.val_path else None
    resize = Resize(base=d.default_resize.base, patch=d.default_resize.patch)
    train_ds = ImageDataset(train_set.samples, resize, patch)
    plan = BatchPlan(len(train_ds), d.micro_batch_size, acc.num_processes, acc.process_index, seed, d.shuffle)
    steps = total_steps(recipe.optim, plan.steps_per_epoch())

    # nets and losses
    lpips, dino, perceptual_notes = load_perceptual(recipe, dev)
    pcfg = pixel_config(recipe, width, patch, dino)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        decoder = PixelDecoder(pcfg)
        disc = None
        weights = DecoderLossWeights.from_section(recipe.decoder)
        if weights.gan.weight > 0:
            base = max(8, pcfg.channels[-1])
            disc = PatchDiscriminator(channels=base, layers=3, groups=min(32, base))
    loss_fn = DecoderLoss(weights, lpips, dino, disc)
    o = recipe.optim
    opt = make_optimizer(decoder, o)
    sched = make_scheduler(opt, o.schedule, steps)
    dopt = None
    if disc is not None:  # its LR follows the same schedule, set at each of its steps
        dopt = torch.optim.AdamW(disc.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)
        decoder, disc, opt, dopt = acc.prepare(decoder, disc, opt, dopt)
        loss_fn.discriminator = disc
    else:
        decoder, opt = acc.prepare(decoder, opt)
    raw_dec = acc.unwrap_model(decoder)
    raw_disc = acc.unwrap_model(disc) if disc is not None else None

    def model_tensors() -> dict[str, torch.Tensor]:
        t = {f"pixel_decoder.{k}": v for k, v in raw_dec.state_dict().items()}
        if raw_disc is not None:
            t.update({f"discriminator.{k}": v for k, v in raw_disc.state_dict().items()})
        return t

    # position
    step, epoch, batch_pos = 0, 0, 0
    skipped: list[str] = []
    fingerprint = recipe_fingerprint(recipe)
    root = out / "checkpoints"
    resumed_from = None
    c = ckpt.open_for_resume(root, fingerprint, "decoder") if resume else None
    if c is not None:
        last, st = c.path, c.state
        raw_dec.load_state_dict({k[len("pixel_decoder."):]: v for k, v in c.model.items()
                                 if k.startswith("pixel_decoder.")})
        opt.load_state_dict(c.optimizer_state())
        sched.load_state_dict(st["scheduler"])
        if raw_disc is not None:
            raw_disc.load_state_dict({k[len("discriminator."):]: v for k, v in c.model.items()
                                      if k.startswith("discriminator.")})
            if (last / f"{DISC_OPT}.safetensors").is_file():
                dopt.load_state_dict(ckpt.unflatten_optimizer(ckpt.load_tensors(last / f"{DISC_OPT}.safetensors"),
                                                              ckpt.load_json(last / f"{DISC_OPT}.json")))
        step, epoch, batch_pos = int(st["step"]), int(st["epoch"]), int(st["batch"])
        skipped = list(st.get("skipped", []))
        c.restore_rng(acc.process_index)
        resumed_from = last

    def save() -> Path:
        def write(tmp):
            if dopt is not None:
                t, meta = ckpt.flatten_optimizer(dopt.state_dict())
                ckpt.save_tensors(t, tmp / f"{DISC_OPT}.safetensors")
                ckpt.save_json(meta, tmp / f"{DISC_OPT}.json")
            state = {"step": step, "epoch": epoch, "batch": batch_pos, "scheduler": sched.state_dict(),
                     "skipped": skipped[:100], "fingerprint": fingerprint, "task": "decoder"}
            ckpt.write_main(tmp, model_tensors(), opt.state_dict(), state)

        final = ckpt.save_step(acc, root, step, write, recipe.runtime.keep_last)
        emit("save", {"checkpoint": str(final)})
        return final

    def emit(kind, metrics=None, message=""):
        if progress is not None and acc.is_main_process:
            progress(ProgressEvent(kind, step, steps, metrics or {}, [], message))

    def micro_batches():
        nonlocal epoch, batch_pos
        while True:
            batches = plan.epoch(epoch)
            if batch_pos < len(batches):
                g = torch.Generator().manual_seed(seed * 7919 + epoch)  # keeps the global RNG untouched
                loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches[batch_pos:],
                                                     num_workers=d.num_workers, collate_fn=_as_list, generator=g)
                for items in loader:
                    batch_pos += 1
                    yield items
            epoch += 1
            batch_pos = 0

    def features_of(items) -> tuple[Optional[torch.Tensor], Optional[Packing], list[torch.Tensor]]:
        good = []
        for it in items:
            if it.pixels is None:
                skipped.append(f"image {it.index} ({it.source}): {it.error}")
                log.warning("skipping image %s: %s", it.source, it.error)
            else:
                good.append(it)
        if not good:
            return None, None, []
        pixels = [it.pixels for it in good]
        codes = tok.encode_pixels(pixels)
        feats = tok.embed(codes)
        packing = Packing(tuple((int(c.shape[0]), int(c.shape[1])) for c in codes))
        feats = torch.cat(feats).clone().to(dev)  # out of inference mode: a plain tensor autograd may save
        return feats, packing, [p.to(dev) for p in pixels]

    rt = recipe.runtime
    history: list[dict] = []
    last_ckpt = None
    writer = MetricsWriter(out / "tensorboard" if rt.tensorboard and acc.is_main_process else None)
    val_images = ImageDataset(val_set.samples, resize, patch) if val_set is not None else None
    evals: dict = {}

    def run_eval(label: str) -> dict:
        """Pixel decoder vs the tokenizer's VAE path on held-out images."""
        raw_dec.eval()
        metrics = evaluate(tok, raw_dec, val_images, eval_limit, lpips, dev)
        raw_dec.train()
        writer.eval_done(label, metrics, step, acc.is_main_process)
        emit("eval", {"label": label, **metrics})
        return metrics

    t0 = time.time()
    decoder.train()
    if disc is not None:
        disc.train()
    emit("start", {"total_steps": steps})
    if acc.is_main_process:
        n = sum(p.numel() for p in raw_dec.parameters())
        log.info("%s decoder stage: %d steps, pixel decoder %d parameters, %d train images", recipe.run.name,
                 steps, n, len(train_ds))
    stream = micro_batches()
    while step < steps:
        sums: dict[str, float] = {}
        micro = 0
        while micro < o.grad_accum:
            feats, packing, targets = features_of(next(stream))
            if feats is None:
                continue
            micro += 1
            with acc.autocast():
                out_ = decoder(feats, packing)
                terms = loss_fn.generator_loss(out_, targets, step, raw_dec.last_layer)
            acc.backward(terms["total"] / o.grad_accum)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / o.grad_accum
            if loss_fn.gan_active(step):
                with acc.autocast():
                    dterms = loss_fn.discriminator_loss(targets, [x.detach() for x in out_.images], step)
                acc.backward(dterms["total"] / o.grad_accum)
                for k, v in dterms.items():
                    key = "disc_total" if k == "total" else k
                    sums[key] = sums.get(key, 0.0) + float(v.detach()) / o.grad_accum
        if o.grad_clip:
            acc.clip_grad_norm_(decoder.parameters(), o.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if dopt is not None and loss_fn.gan_active(step):
            if o.grad_clip:
                acc.clip_grad_norm_(disc.parameters(), o.grad_clip)
            for g in dopt.param_groups:
                g["lr"] = o.lr * o.schedule.lr_factor(step, steps)
            dopt.step()
            dopt.zero_grad(set_to_none=True)
        step += 1
        rec = {"step": step, "lr": lr, **sums}
        history.append(rec)
        bad = [k for k, v in sums.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {step}: non-finite loss terms {bad}")
        emit("step", rec)
        if due(rt.log_every, step, steps):
            log.info("step %d/%d %s", step, steps, format_metrics(sums))
            writer.scalars("train", rec, step)
            emit("log", rec)
        if val_images is not None and due(rt.eval_every, step, steps, at_end=False):
            evals[f"step-{step}"] = run_eval(f"step {step}")
        if due(rt.save_every, step, steps):
            last_ckpt = save()
    elapsed = time.time() - t0

    if val_images is not None:
        evals["final"] = run_eval("final")
    raw_dec.eval()
    writer.close()

    # outputs
    viq_dir = out / "viq"
    state_path = out / "model.safetensors"
    metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "task": "decoder", "steps": step,
               "elapsed_s": round(elapsed, 2), "processes": acc.num_processes, "tokenizer": str(init),
               "pixel_decoder": pcfg.model_dump(mode="json"), "perceptual": perceptual_notes,
               "train": history[-1] if history else None, "eval": evals.get("final", {}),
               "eval_during": {k: v for k, v in evals.items() if k != "final"}, "skipped": skipped[:100]}
    if acc.is_main_process:
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in model_tensors().items()}, state_path,
                          metadata={"format": "viq-decoder-stage"})
        state = {k: v.detach().cpu() for k, v in tok.model.state_dict().items()}
        state.update({f"pixel_decoder.{k}": v.detach().cpu() for k, v in raw_dec.state_dict().items()})
        cfg = tok.config.model_copy(update={"pixel_decoder": pcfg})
        save_viq(state, cfg, viq_dir, source_info={"kind": "viq-decoder-stage", "recipe": recipe.run.name,
                                                   "stage": recipe.run.stage, "steps": step,
                                                   "tokenizer": str(init), "fingerprint": fingerprint})
        write_json(metrics, out / "metrics.json")
        log.info("done: %d steps in %.1fs; outputs in %s", step, elapsed, out)
    emit("end", {"steps": step})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(out, recipe.run.stage, step, metrics, out / "metrics.json", state_path, viq_dir, last_ckpt,
                       resumed_from, None, history, [str(b) for b in train_set.bad] + skipped)


@torch.no_grad()
def evaluate(tok, decoder, ds: ImageDataset, limit: Optional[int], lpips, dev) -> dict:
    """Mean PSNR (dB, on the resized image before padding) of both decoders; LPIPS too with a net."""
    from viq.eval.metrics import psnr

    n = len(ds) if limit is None else min(limit, len(ds))
    has_vae = "drawer" in tok.model.parts
    rows = {"pixel": {"psnr": [], "lpips": []}, "vae": {"psnr": [], "lpips": []}}
    for i in range(n):
        it = ds[i]
        if it.pixels is None:
            continue
        h, w = it.size
        codes = tok.encode_pixels([it.pixels])
        feats = torch.cat(tok.embed(codes)).clone().to(dev)
        grid = (int(codes[0].shape[0]), int(codes[0].shape[1]))
        outs = {"pixel": decoder.to_uint8(decoder.decode(feats, Packing((grid,)))[0]).cpu()}
        if has_vae:
            outs["vae"] = tok.reconstruct(codes, decoder="vae")[0].cpu()
        ref = _to_uint8(it.pixels)[:h, :w]
        for name, img in outs.items():
            img = img[:h, :w]
            rows[name]["psnr"].append(psnr(img, ref))
            if lpips is not None:
                a = img.permute(2, 0, 1).float().div(127.5).sub(1)[None].to(dev)
                b = ref.permute(2, 0, 1).float().div(127.5).sub(1)[None].to(dev)
                rows[name]["lpips"].append(float(lpips(a, b).mean()))
    out = {"images": n}
    for name, r in rows.items():
        if r["psnr"]:
            finite = [v for v in r["psnr"] if math.isfinite(v)]
            out[f"psnr_{name}"] = float(np.mean(finite)) if finite else math.inf
            if r["lpips"]:
                out[f"lpips_{name}"] = float(np.mean(r["lpips"]))
    if "psnr_pixel" in out and "psnr_vae" in out:
        out["psnr_better"] = "pixel" if out["psnr_pixel"] > out["psnr_vae"] else "vae"
    return out
