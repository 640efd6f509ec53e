"""What the training engine tells its caller as it runs (a progress bar, a log, a test); trackers
(TensorBoard, W&B, MLflow) are accelerate's, set up in ``viq.train.setup``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class ProgressEvent:
    """What the loop tells a progress callback (main process only, except ``sample_indices``)."""

    #: start | resume | eval_start | eval_progress (metrics: label, done, total) | eval | step | log | save | end
    kind: str
    step: int
    total: int
    metrics: dict = field(default_factory=dict)
    sample_indices: list[int] = field(default_factory=list)  # this process's samples of the step
    message: str = ""
    main: bool = True  # sent by the main process (a progress bar should show only these)


ProgressFn = Callable[[ProgressEvent], None]


def due(every: Optional[int], step: int, total: int, at_end: bool = True) -> bool:
    """Whether a periodic action (log, eval, save every ``every`` steps) falls on ``step``.

    ``at_end``: also on the last step. Evaluations pass False, since the engine runs its final
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
