"""What a training loop tells its caller as it runs (a progress bar, a log, a test)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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
