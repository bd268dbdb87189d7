"""One training epoch and one validation pass of a stage over any iterable of (images, labels) batches,
after torchvision's references/classification `train_one_epoch` and `evaluate`.

What depends on running as one of several data-parallel workers comes in as `Workers`: Ray Train's
workers pass reductions over their process group (orchestrator.distributed.train); a single process
passes nothing and its numbers stand as they are.

Layer 1: plain torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.quant.policy import BitAssignment
from orchestrator.train.compiled import CompiledPass
from orchestrator.train.progress import Progress
from orchestrator.train.stages import Training
from orchestrator.train.steps import evaluate_policies

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
VALIDATION_METRICS = ("loss", "top1", "top5")


def _as_they_are(values: list[float]) -> list[float]:
    return values


def _this_one(has_batch: bool) -> bool:
    return has_batch


@dataclass(frozen=True)
class Workers:
    """How one worker's numbers meet its group's: `count` workers; `sum` adds every worker's list of
    numbers element by element; `every_one_has` is True while every worker still has a batch (DDP
    waits forever for a worker that ran out). The defaults: one process alone."""

    count: int = 1
    sum: Callable[[list[float]], list[float]] = _as_they_are
    every_one_has: Callable[[bool], bool] = _this_one


ALONE = Workers()


class MetricSums:
    """Sample-weighted running sums of step metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * samples
        self.count += samples

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}


def _compile_metrics(compiled: CompiledPass | None) -> dict[str, float]:
    """This worker's compilation cost so far (seconds, the same every epoch once compiled; counted in
    the epoch's images_per_second) and how many passes ran compiled; nothing when eager."""
    if compiled is None:
        return {}
    metrics = {"compiled_passes": float(compiled.calls)}
    if compiled.compile_seconds is not None:
        metrics["compile_seconds"] = compiled.compile_seconds
    return metrics


def train_one_epoch(model: nn.Module, training: Training, batches: Batches, steps: int, epoch: int,
                    workers: Workers = ALONE, progress: Progress | None = None) -> dict[str, float]:
    """At most `steps` steps of `training` (the scheduler stepped after each) over `batches`, ending
    early when a worker runs out. Returns the epoch's step metrics (sample-weighted per worker, then
    averaged over the workers), the images per second of all workers together and, when compiled, the
    compilation's cost. `epoch` (0-based) labels the progress bar, which is closed at the end."""
    model.train()
    sums, images, started = MetricSums(), 0, time.monotonic()
    iterator = iter(batches)
    for step in range(steps):
        batch = next(iterator, None)
        # a kept last batch of one image cannot go through BatchNorm in training mode: it ends the epoch
        if not workers.every_one_has(batch is not None and len(batch[1]) > 1):
            break
        inputs, labels = batch
        metrics = training.step(inputs, labels)
        training.scheduler.step()  # per step; a per-epoch schedule holds its rate within the epoch
        sums.add(metrics, len(labels))
        images += len(labels)
        if progress is not None:
            progress.update(epoch, step, len(labels), metrics)
    if progress is not None:
        progress.close()  # the epoch's bar ends with its steps, before validation
    seconds = time.monotonic() - started
    means = sums.means()
    keys = sorted(means)  # the same order on every worker
    result = {key: total / workers.count for key, total in zip(keys, workers.sum([means[key] for key in keys]))}
    result["images_per_second"] = workers.sum([images / max(seconds, 1e-9)])[0]
    result.update(_compile_metrics(training.compiled))
    return result


def validate(model: nn.Module, batches: Batches, criterion: nn.Module,
             policies: Mapping[str, BitAssignment | None], metrics: Sequence[str] = VALIDATION_METRICS,
             bf16: bool = False, workers: Workers = ALONE) -> dict[str, float]:
    """`val_<metric><suffix>` for each policy (suffix -> policy; None: the model as it stands) over
    every worker's batches, weighted by sample count. Each batch is decoded once and scored at every
    policy."""
    results = evaluate_policies(model, batches, criterion, policies, bf16)
    out = {}
    for suffix, result in results.items():
        samples = result["samples"]
        *totals, all_samples = workers.sum([result[key] * samples if samples else 0.0 for key in VALIDATION_METRICS]
                                           + [float(samples)])
        for key, total in zip(VALIDATION_METRICS, totals):
            if key in metrics:
                out[f"val_{key}{suffix}"] = total / max(all_samples, 1)
    return out
