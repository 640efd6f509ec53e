"""What a training loop tells its caller as it runs (a progress bar, a log, TensorBoard, a test)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("viq.train")


@dataclass
class ProgressEvent:
    """What the loop tells a progress callback (main process only, except ``sample_indices``)."""

    kind: str  # start | step | log | eval | save | end
    step: int
    total: int
    metrics: dict = field(default_factory=dict)
    sample_indices: list[int] = field(default_factory=list)  # this process's samples of the step
    message: str = ""
    main: bool = True  # sent by the main process (a progress bar should show only these)


ProgressFn = Callable[[ProgressEvent], None]


def due(every: Optional[int], step: int, total: int, at_end: bool = True) -> bool:
    """Whether a periodic action (log, eval, save every ``every`` steps) falls on ``step``.

    ``at_end``: also on the last step. Evaluations pass False, since every loop runs its final
    evaluation after the last step anyway.
    """
    if step == total:
        return at_end
    return bool(every) and step % every == 0


def flat_metrics(d: dict, prefix: str = "") -> dict:
    """Nested metrics as ``{"a/b": number}``; non-numbers are left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in flat_metrics(metrics).items())


class MetricsWriter:
    """TensorBoard scalars when ``runtime.tensorboard`` is on and tensorboard is installed; else nothing."""

    def __init__(self, path: Optional[Path]):
        self._writer = None
        if path is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            log.warning("runtime.tensorboard is on but tensorboard is not installed (pip install "
                        "'viq[tensorboard]'); no event files written")
            return
        self._writer = SummaryWriter(str(path))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def eval_done(self, label: str, metrics: dict, step: int, main: bool) -> dict:
        """An evaluation's one log line (main process) and its scalars; returns the metrics."""
        if main:
            log.info("eval (%s): %s", label, format_metrics(metrics))
        self.scalars("eval", metrics, step)
        return metrics

    def scalars(self, group: str, metrics: dict, step: int) -> None:
        if self._writer is not None:
            for k, v in flat_metrics(metrics).items():
                self._writer.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
