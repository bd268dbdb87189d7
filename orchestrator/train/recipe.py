"""Optimizer, schedule and loss of a training recipe (plain torch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.config import RecipeConfig


def make_optimizer(model: nn.Module, recipe: RecipeConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine / step (x0.1 at 1/3 and 2/3) / constant."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(recipe.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if recipe.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if recipe.scheduler == "step":
            return 0.1 ** int(progress * 3)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_criterion(recipe: RecipeConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
