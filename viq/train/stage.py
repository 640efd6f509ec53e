"""What a training stage supplies to the engine: its model, its micro-batches, its loss (and its export).

Everything else (accumulation, clipping, optimizer and schedule, cadence, checkpoints, resume,
trackers) belongs to ``viq.train.engine.Engine``, so it is written and fixed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from viq.train.optim import param_groups


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # index of the next micro-batch within the epoch


@dataclass
class StepOutput:
    """One micro-batch's result: the loss to backpropagate and what to log about it."""

    loss: torch.Tensor
    terms: dict = field(default_factory=dict)  # name -> number or 0-d tensor (averaged over micro-batches)
    counts: dict = field(default_factory=dict)  # name -> int (summed); "tokens" feeds tokens/s
    samples: list = field(default_factory=list)  # data-file indices this process read
    stats: dict = field(default_factory=dict)  # stage-private (``Stage.observe``)


@dataclass
class Export:
    """What a stage wrote at the end."""

    metrics: dict
    state_path: Path
    viq_dir: Optional[Path] = None


EvalTick = Callable[[int, int], None]  # (done, total) while an evaluation runs


class Stage:
    """Base class: defaults for a stage whose whole model trains with AdamW (see the module docstring)."""

    task: str = ""
    model: nn.Module
    has_eval: bool = False
    eval_at_start: bool = False

    def total_steps(self) -> int:
        raise NotImplementedError

    def optimizer_groups(self, optim) -> list[dict]:
        return param_groups(self.model, optim.weight_decay)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets clipped separately to ``optim.grad_clip`` (the first one's norm is logged)."""
        return [[p for p in self.model.parameters() if p.requires_grad]]

    def micro_batches(self, pos: DataPosition, skips) -> Iterator[tuple[object, DataPosition]]:
        """Micro-batches forever from ``pos``, each with the position after it; bad samples go to
        ``skips.note(key, text)``."""
        raise NotImplementedError

    def to_device(self, batch, device):
        return batch.to(device)

    def loss(self, model: nn.Module, batch, step: int) -> StepOutput:
        raise NotImplementedError

    def observe(self, out: StepOutput) -> None:
        """Accumulate window statistics (e.g. codebook usage) from one micro-batch."""

    def window_metrics(self, accelerator) -> dict:
        """Extra numbers for a log window (reduced across processes), then reset."""
        return {}

    def on_device(self, accelerator) -> None:
        """After ``prepare``: move frozen parts (targets, embedders) to the device."""

    def eval_size(self) -> int:
        return 0

    def evaluate(self, model: nn.Module, tick: EvalTick) -> dict:
        return {}

    # ---- checkpoint content ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds (default: the trainable parameters)."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach() for k, v in self.model.state_dict().items() if k in names}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Strict: exactly the tensors ``state_tensors`` names, with their shapes."""
        expected = self.state_tensors()
        check_exact(expected, tensors, where)
        with torch.no_grad():
            for k, t in expected.items():
                t.copy_(tensors[k].to(t.dtype))

    def state(self) -> dict:
        """JSON-able stage state a checkpoint carries besides the engine's."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def export(self, result) -> Export:
        raise NotImplementedError


def check_exact(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        from viq.errors import KeyMismatchError

        raise KeyMismatchError(f"{where} (resume)", missing, unexpected,
                               [f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}" for k in wrong])
