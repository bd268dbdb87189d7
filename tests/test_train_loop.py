"""The epoch loop of orchestrator.train.loop without Ray: a stage's epochs over plain tensors in one
process, and how a worker group's hooks (sums over the workers, "every worker still has a batch")
enter its numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.config.schema import PipelineConfig
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.loop import Workers, train_one_epoch, validate
from orchestrator.train.stages import FINETUNE, FP, INDICATORS, STAGES

BATCH = 16
TESTS = Path(__file__).resolve().parent


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _tiny_joint_model() -> nn.Module:
    """The tiny model with step sizes at bits 4 and 2 (its middle conv searchable)."""
    model = _tiny_model()
    quantize_model(model, bits=[4, 2], input_size=8)
    return model


def _batches(images: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable task: the class is whether the image's mean is positive."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, 8, 8, generator=generator) + torch.randn(images, 1, 1, 1, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, images, BATCH)]


def _config(**recipes) -> PipelineConfig:
    return PipelineConfig.model_validate({"data": {"demo": True}, "training": {"compile": "off"}, **recipes})


def test_two_plain_epochs_in_one_process_without_ray_or_mlflow() -> None:
    """The FP stage's own recipe and step, two epochs: the loss goes down and every metric is finite;
    Ray and MLflow are never imported (a fresh interpreter, so nothing else loaded them)."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_train_loop import _batches, _config, _tiny_model
        from orchestrator.train.loop import train_one_epoch, validate
        from orchestrator.train.stages import FP

        cfg, model, batches = _config(fp={{"epochs": 2, "lr": 0.05}}), _tiny_model(), _batches()
        steps = FP.steps_per_epoch(64, 16)
        training = FP.training(model, cfg, steps)
        epochs = [train_one_epoch(model, training, batches, steps, epoch) for epoch in range(2)]
        val = validate(model, batches, training.criterion, FP.validation_policies(model, cfg), FP.validation_metrics)
        print(json.dumps({{"epochs": epochs, "val": val, "steps": training.scheduler.last_epoch,
                          "loaded": sorted({{"ray", "mlflow"}} & {{name.split(".")[0] for name in sys.modules}})}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["loaded"] == []
    first, second = result["epochs"]
    assert second["loss"] < first["loss"], result["epochs"]
    assert result["steps"] == 8
    assert set(result["val"]) == {"val_loss", "val_top1", "val_top5"}
    for metrics in (first, second, result["val"]):
        assert all(math.isfinite(value) for value in metrics.values()), metrics


def test_indicator_stage_takes_joint_steps_keeps_the_partial_batch_and_validates_at_each_bit_width() -> None:
    cfg = _config(indicators={"bits": [4, 2], "epochs": 1, "lr": 0.01})
    model = _tiny_joint_model()
    batches = _batches(72)  # four full batches and one of 8
    steps = INDICATORS.steps_per_epoch(72, BATCH)
    assert steps == 5 and FP.steps_per_epoch(72, BATCH) == FINETUNE.steps_per_epoch(72, BATCH) == 4
    training = INDICATORS.training(model, cfg, steps)
    metrics = train_one_epoch(model, training, batches, steps, 0)
    assert training.scheduler.last_epoch == 5  # the partial batch was a step
    assert {"loss_w4", "top1_w2", "loss_random", "top1_random", "images_per_second"} <= set(metrics)
    val = validate(model, batches, training.criterion, INDICATORS.validation_policies(model, cfg),
                   INDICATORS.validation_metrics)
    assert set(val) == {"val_loss_w4", "val_top1_w4", "val_loss_w2", "val_top1_w2"}


def test_a_batch_of_one_or_a_worker_that_ran_out_ends_the_epoch() -> None:
    cfg = _config()
    model = _tiny_model()
    batches = _batches(49)  # three full batches and one of a single image
    training = FP.training(model, cfg, 4)
    train_one_epoch(model, training, batches, 4, 0)
    assert training.scheduler.last_epoch == 3  # BatchNorm cannot train on one image
    calls = []

    def two_batches_each(has_batch: bool) -> bool:  # another worker's shard holds only two batches
        calls.append(has_batch)
        return has_batch and len(calls) <= 2

    train_one_epoch(model, training, batches, 4, 1, Workers(every_one_has=two_batches_each))
    assert training.scheduler.last_epoch == 3 + 2 and calls == [True, True, True]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_group_of_identical_workers_reports_what_one_does(name: str) -> None:
    """Two workers that saw the same numbers: their sums are twice one worker's, and the reported
    step means and validation metrics are one worker's."""
    stage, cfg, batches = STAGES[name], _config(indicators={"bits": [4, 2]}), _batches()
    twins = Workers(count=2, sum=lambda values: [2 * value for value in values])
    reported = []
    for workers in (Workers(), twins):
        model = _tiny_model() if name == "fp" else _tiny_joint_model()
        training = stage.training(model, cfg, 4)
        metrics = train_one_epoch(model, training, batches, 4, 0, workers)
        del metrics["images_per_second"]  # a rate, not the same twice
        metrics.update(validate(model, batches, training.criterion, stage.validation_policies(model, cfg),
                                stage.validation_metrics, workers=workers))
        reported.append(metrics)
    alone, two = reported
    assert two == pytest.approx(alone) and all(math.isfinite(value) for value in alone.values())
