"""The decoder stage (``run.task: decoder``): a pixel decoder trained on a frozen ViQ tokenizer.

    image ─frozen encoder + head (init.ckpt, a viq directory)─▶ codes ─frozen embedder─▶ features
      ─trainable PixelDecoder (model.pixel_decoder)─▶ RGB, compared with the image padded to the patch grid

* Losses (``decoder.mse|lpips|kl|gan|repa``, each can be off): ``viq.train.decoder_losses.DecoderLoss``,
  all computed inside ``DecoderPair.forward`` (so DDP sees one forward). The GAN's PatchDiscriminator
  (base width = the pixel decoder's last-stage channels, at least 8; 3 layers) joins at
  ``gan.start_step``; it trains in the same AdamW as its own parameter group (no weight decay, same
  schedule) and is clipped on its own. Its parameters have no gradient before the GAN starts, so
  AdamW leaves them untouched until then.
* Data and perceptual nets: ``viq.train.stages.decoder_parts``.

Outputs under ``recipe.out_dir``: ``model.safetensors`` (pixel decoder + discriminator), ``viq/``
(the tokenizer's parts + the trained ``pixel_decoder`` part, loadable with
``load_tokenizer(..., parts=(..., "pixel_decoder"))``) and ``metrics.json`` with held-out PSNR (and
LPIPS with the loss's LPIPS net) of the pixel decoder against the tokenizer's VAE path on
``data.val_path``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from viq.nn.vit import Packing
from viq.train.optim import param_groups, total_steps
from viq.train.setup import check_architecture, frozen_tokenizer_dir, read_data, recipe_fingerprint
from viq.train.stage import DataPosition, Export, Stage, StepOutput
from viq.train.stages.decoder_parts import (ImageDataset, _as_list, _to_uint8, load_perceptual, pixel_config,
                                            source_parts)

log = logging.getLogger("viq.train.decoder")


class DecoderPair(nn.Module):
    """What trains: the pixel decoder and its discriminator; ``forward`` returns the whole loss."""

    def __init__(self, pixel_decoder: nn.Module, discriminator: Optional[nn.Module], loss_fn):
        super().__init__()
        self.pixel_decoder, self.discriminator = pixel_decoder, discriminator
        self._loss = (loss_fn,)  # not a submodule: its perceptual nets are frozen and not checkpointed

    def forward(self, feats, packing, targets, step: int):
        loss_fn = self._loss[0]
        out = self.pixel_decoder(feats, packing)
        terms = loss_fn.generator_loss(out, targets, step, self.pixel_decoder.last_layer)
        total = terms["total"]
        if loss_fn.gan_active(step):
            dterms = loss_fn.discriminator_loss(targets, [x.detach() for x in out.images], step)
            total = total + dterms["total"]  # the fakes are detached: this part reaches only the discriminator
            terms.update({("disc_total" if k == "total" else k): v for k, v in dterms.items()})
        return total, terms


class DecoderStage(Stage):
    task = "decoder"

    @staticmethod
    def check(recipe) -> None:
        frozen_tokenizer_dir(recipe, "a trained tokenizer's viq weights directory")

    def __init__(self, recipe, acc, out: Path, resume: bool, eval_limit: Optional[int]):
        from viq.data.conversations import Resize
        from viq.mllm.collate import BatchPlan
        from viq.model.discriminator import PatchDiscriminator
        from viq.model.pixel_decoder import PixelDecoder
        from viq.tokenizer import load_tokenizer
        from viq.train.decoder_losses import DecoderLoss, DecoderLossWeights

        self.recipe, self.acc, self.out, self.eval_limit = recipe, acc, out, eval_limit
        self.init = init = frozen_tokenizer_dir(recipe, "a trained tokenizer's viq weights directory")
        dev, seed = acc.device, recipe.run.seed
        # frozen tokenizer (fp32: its parts are written back unchanged)
        tok = load_tokenizer(init, parts=source_parts(init), device=str(dev), dtype=torch.float32)
        check_architecture(recipe, tok.config, init)
        tok.model.eval().requires_grad_(False)
        self.tok, patch = tok, tok.patch
        d = recipe.data
        self.train_set = read_data(d.path, d.image_root, d.sample_fraction, d.max_bad_fraction, "train", recipe)
        val_set = read_data(d.val_path, d.image_root, None, d.max_bad_fraction, "val", recipe) if d.val_path else None
        resize = Resize(base=d.default_resize.base, patch=d.default_resize.patch)
        self.train_ds = ImageDataset(self.train_set.samples, resize, patch)
        self.val_images = ImageDataset(val_set.samples, resize, patch) if val_set is not None else None
        self.has_eval = self.val_images is not None
        self.plan = BatchPlan(len(self.train_ds), d.micro_batch_size, acc.num_processes, acc.process_index, seed,
                              d.shuffle)
        self.steps = total_steps(recipe.optim, self.plan.steps_per_epoch())

        self.lpips, dino, self.perceptual_notes = load_perceptual(recipe, dev)
        self.pcfg = pixel_config(recipe, tok.config.vit.width, patch, dino)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 11)
            decoder = PixelDecoder(self.pcfg)
            disc = None
            weights = DecoderLossWeights.from_section(recipe.decoder)
            if weights.gan.weight > 0:
                base = max(8, self.pcfg.channels[-1])
                disc = PatchDiscriminator(channels=base, layers=3, groups=min(32, base))
        self.model = DecoderPair(decoder, disc, DecoderLoss(weights, self.lpips, dino, disc))
        if acc.is_main_process:
            log.info("%s decoder stage: %d steps, pixel decoder %d parameters, %d train images", recipe.run.name,
                     self.steps, sum(p.numel() for p in decoder.parameters()), len(self.train_ds))

    def total_steps(self) -> int:
        return self.steps

    def optimizer_groups(self, optim) -> list[dict]:
        groups = param_groups(self.model.pixel_decoder, optim.weight_decay)
        if self.model.discriminator is not None:
            groups.append({"params": list(self.model.discriminator.parameters()), "weight_decay": 0.0})
        return groups

    def clip_groups(self):
        out = [list(self.model.pixel_decoder.parameters())]
        if self.model.discriminator is not None:
            out.append(list(self.model.discriminator.parameters()))
        return out

    def micro_batches(self, pos: DataPosition, skips):
        d, seed = self.recipe.data, self.recipe.run.seed
        epoch, b = pos.epoch, pos.batch
        while True:
            batches = self.plan.epoch(epoch)
            if b < len(batches):
                g = torch.Generator().manual_seed(seed * 7919 + epoch)  # keeps the global RNG untouched
                loader = torch.utils.data.DataLoader(self.train_ds, batch_sampler=batches[b:],
                                                     num_workers=d.num_workers, collate_fn=_as_list, generator=g)
                for items in loader:
                    b += 1
                    good = []
                    for it in items:
                        if it.pixels is None:
                            skips.note(f"image {it.index}", f"image {it.index} ({it.source}): {it.error}")
                        else:
                            good.append(it)
                    if good:  # a micro-batch of only bad images is passed over
                        yield good, DataPosition(epoch, b)
            epoch, b = epoch + 1, 0

    def to_device(self, batch, device):
        return batch  # the frozen tokenizer reads the pixels where they are

    def loss(self, model, items, step: int) -> StepOutput:
        dev = self.acc.device
        pixels = [it.pixels for it in items]
        codes = self.tok.encode_pixels(pixels)
        packing = Packing(tuple((int(c.shape[0]), int(c.shape[1])) for c in codes))
        feats = torch.cat(self.tok.embed(codes)).clone().to(dev)  # out of inference mode: autograd may save it
        total, terms = model(feats, packing, [p.to(dev) for p in pixels], step)
        return StepOutput(total, {k: v.detach() for k, v in terms.items()},
                          {"tokens": sum(h * w for h, w in packing.grids)}, [it.index for it in items])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def eval_size(self) -> int:
        n = len(self.val_images)
        return n if self.eval_limit is None else min(self.eval_limit, n)

    def evaluate(self, model, tick) -> dict:
        dec = model.pixel_decoder
        dec.eval()
        metrics = evaluate(self.tok, dec, self.val_images, self.eval_limit, self.lpips, self.acc.device, tick)
        dec.train()
        return metrics

    def export(self, result) -> Export:
        from viq.weights.io import write_json, write_safetensors
        from viq.weights.save import save_viq

        recipe, acc, out = self.recipe, self.acc, self.out
        dec = self.model.pixel_decoder
        dec.eval()
        evals, history = result.evals, result.history
        metrics = {"run": recipe.run.name, "stage": recipe.run.stage, "task": self.task, "steps": result.steps,
                   "elapsed_s": round(result.elapsed_s, 2), "processes": acc.num_processes, "tokenizer": str(self.init),
                   "pixel_decoder": self.pcfg.model_dump(mode="json"), "perceptual": self.perceptual_notes,
                   "train": history[-1] if history else None, "eval": evals.get("final", {}),
                   "eval_during": {k: v for k, v in evals.items() if k != "final"}, "skipped": result.skipped[:100]}
        viq_dir, state_path = out / "viq", out / "model.safetensors"
        if acc.is_main_process:
            write_safetensors({k: v.cpu().contiguous() for k, v in self.state_tensors().items()}, state_path,
                              metadata={"format": "viq-decoder-stage"})
            state = {k: v.detach().cpu() for k, v in self.tok.model.state_dict().items()}
            state.update({f"pixel_decoder.{k}": v.detach().cpu() for k, v in dec.state_dict().items()})
            cfg = self.tok.config.model_copy(update={"pixel_decoder": self.pcfg})
            save_viq(state, cfg, viq_dir, source_info={"kind": "viq-decoder-stage", "recipe": recipe.run.name,
                                                       "stage": recipe.run.stage, "steps": result.steps,
                                                       "tokenizer": str(self.init),
                                                       "fingerprint": recipe_fingerprint(recipe)})
            write_json(metrics, out / "metrics.json")
        return Export(metrics, state_path, viq_dir)

    def skipped_in_file(self) -> list[str]:
        return [str(b) for b in self.train_set.bad]


@torch.no_grad()
def evaluate(tok, decoder, ds: ImageDataset, limit: Optional[int], lpips, dev, tick=None) -> dict:
    """Mean PSNR (dB, on the resized image before padding) of both decoders; LPIPS too with a net."""
    from viq.eval.metrics import psnr

    n = len(ds) if limit is None else min(limit, len(ds))
    has_vae = "drawer" in tok.model.parts
    rows = {"pixel": {"psnr": [], "lpips": []}, "vae": {"psnr": [], "lpips": []}}
    for i in range(n):
        if tick is not None:
            tick(i + 1, n)
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
