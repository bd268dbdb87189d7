"""One progress bar per stage and epoch: step, ETA, rate, and the latest loss/top-1 in its label.

`bar` is the tqdm class that draws it: plain `tqdm.tqdm` in one process, or Ray's distributed
`ray.experimental.tqdm_ray.tqdm` inside Ray workers, which forwards the bar's state to the driver's
console (this layer does not import Ray, so the caller chooses).
"""

from __future__ import annotations

import time
from typing import Any

import tqdm

SHOWN_METRICS = 3  # keys of the step's metrics in the bar's label: enough for loss and top-1 at one bit-width


class Progress:
    """Usage: `update()` after every training step, `close()` after an epoch's last one (an epoch's
    first `update()` also closes the bar of the one before)."""

    def __init__(self, stage: str, epochs: int, steps_per_epoch: int, bar: Any = tqdm.tqdm,
                 enabled: bool = True) -> None:
        self.stage, self.epochs, self.steps_per_epoch = stage, epochs, steps_per_epoch
        self._bar_class, self._enabled = bar, enabled
        self._bar = None
        self._epoch = -1
        self._start = time.monotonic()
        self._images = 0

    def update(self, epoch: int, step: int, images: int, metrics: dict[str, float]) -> None:
        """`epoch` and `step` are 0-based positions of the step just finished."""
        self._images += images
        if not self._enabled:
            return
        if epoch != self._epoch:
            self.close()
            self._epoch = epoch
            self._bar = self._bar_class(desc=self._label(), total=self.steps_per_epoch, unit="step")
            self._bar.update(step)  # a resumed epoch starts part-way
        shown = " ".join(f"{k}={v:.3f}" for k, v in list(metrics.items())[:SHOWN_METRICS])
        self._bar.set_description(self._label() + (f" {shown}" if shown else ""))
        self._bar.update(1)

    def _label(self) -> str:
        return f"{self.stage} epoch {self._epoch + 1}/{self.epochs}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def images_per_second(self) -> float:
        return self._images / max(1e-9, time.monotonic() - self._start)
