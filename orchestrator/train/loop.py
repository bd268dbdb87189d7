"""In-process epoch loop with exact mid-run resume (plain torch).

Ray Train workers run the same step functions on their own data shards (orchestrator.distributed);
this loop is what runs them on one process: a seeded sample order per epoch, checkpoints at epoch
ends (and every N steps if asked) that hold the position, running metric sums and every RNG state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from orchestrator.config import RecipeConfig
from orchestrator.train.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from orchestrator.train.progress import Progress

StepFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass
class FitResult:
    history: list[dict[str, float]]  # epoch means of the epochs run in this call
    finished: bool  # False when stopped early by `stop_after_steps`


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch drawn from (seed, epoch); `start` skips the samples a resumed
    run already consumed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start


class MetricSums:
    """Sample-weighted running sums of step metrics; plain data so it fits in a checkpoint."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.count: int = int((state or {}).get("count", 0))

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * samples
        self.count += samples

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Full batches only (a batch of one breaks BatchNorm), but at least one step."""
    return max(1, dataset_size // batch_size)


def fit(
    model: nn.Module,
    train_set: Dataset,
    recipe: RecipeConfig,
    *,
    stage: str,
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    seed: int,
    checkpoint_path: str | Path,
    policy_rng: random.Random | None = None,
    device: torch.device = torch.device("cpu"),
    num_workers: int = 0,
    checkpoint_every_steps: int | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Train on every sample of `train_set` for `recipe.epochs`, resuming from `checkpoint_path` when it exists.

    `on_epoch_end(epoch, train_means)` may return extra metrics (e.g. validation) for the history.
    `stop_after_steps` ends the call early after a checkpoint at that global step (tests of resume).
    """
    checkpoint_path = Path(checkpoint_path)
    size = len(train_set)
    per_epoch = steps_per_epoch(size, batch_size)
    sampler = EpochSampler(size, seed)
    start_epoch, start_step, sums = 0, 0, MetricSums()
    if checkpoint_path.exists():
        payload = load_checkpoint(checkpoint_path)
        restore_model(model, payload["model"], checkpoint_path)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], policy_rng)
        start_epoch, start_step = payload["epoch"], payload["step"]
        sums = MetricSums(payload["meta"].get("metric_sums"))

    def checkpoint(epoch: int, step: int) -> None:
        save_checkpoint(checkpoint_path, model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, step=step,
                        policy_rng=policy_rng, meta={**(meta or {}), "stage": stage, "metric_sums": sums.state()})

    progress = Progress(stage, recipe.epochs, per_epoch)
    history = []
    global_step = start_epoch * per_epoch + start_step
    model.train()
    for epoch in range(start_epoch, recipe.epochs):
        sampler.set_epoch(epoch, start_step * batch_size)
        # a private generator: creating the loader must not draw from the global RNG a checkpoint restores
        loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            drop_last=size >= batch_size,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for step, (images, labels) in enumerate(loader, start=start_step):
            if step >= per_epoch:
                break
            metrics = step_fn(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            scheduler.step()
            sums.add(metrics, len(labels))
            progress.update(epoch, step, len(labels), metrics)
            global_step += 1
            mid_epoch = step + 1 < per_epoch
            if mid_epoch and (
                (checkpoint_every_steps and (step + 1) % checkpoint_every_steps == 0) or global_step == stop_after_steps
            ):
                checkpoint(epoch, step + 1)
            if global_step == stop_after_steps:
                return FitResult(history, finished=False)
        start_step = 0
        means = sums.means()
        means["images_per_second"] = progress.images_per_second
        if on_epoch_end is not None:
            means.update(on_epoch_end(epoch, means) or {})
        history.append(means)
        sums = MetricSums()
        checkpoint(epoch + 1, 0)
        if global_step == stop_after_steps and epoch + 1 < recipe.epochs:
            return FitResult(history, finished=False)
    return FitResult(history, finished=True)

