"""Progress lines for long loops (epoch, step, images/s, ETA) that read well in `ray job logs`."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("limpq")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Logs at most every `interval` seconds, plus the last step of every epoch."""

    def __init__(self, stage: str, epochs: int, steps_per_epoch: int, interval: float = 10.0, start_epoch: int = 0,
                 show: bool = True) -> None:
        self.stage, self.epochs, self.steps_per_epoch, self.interval = stage, epochs, steps_per_epoch, interval
        self.show = show
        self._start = self._last = time.monotonic()
        self._images = 0
        self._steps_done = 0

    def update(self, epoch: int, step: int, images: int, metrics: dict[str, float]) -> None:
        """`epoch` and `step` are 0-based positions of the step just finished."""
        self._images += images
        self._steps_done += 1
        if not self.show:
            return
        now = time.monotonic()
        last_of_epoch = step + 1 == self.steps_per_epoch
        if now - self._last < self.interval and not last_of_epoch:
            return
        self._last = now
        elapsed = now - self._start
        remaining_steps = (self.epochs - epoch - 1) * self.steps_per_epoch + (self.steps_per_epoch - step - 1)
        eta = elapsed / self._steps_done * remaining_steps
        shown = " ".join(f"{k}={v:.3f}" for k, v in list(metrics.items())[:4])
        log.info("%s epoch %d/%d step %d/%d %s %.1f img/s ETA %s", self.stage, epoch + 1, self.epochs, step + 1,
                 self.steps_per_epoch, shown, self.images_per_second, _duration(eta))

    @property
    def images_per_second(self) -> float:
        return self._images / max(1e-9, time.monotonic() - self._start)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.show:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val_top1"))
            log.info("%s epoch %d/%d done: %s", self.stage, epoch + 1, self.epochs, shown)

    def close(self) -> None:
        pass
