"""Optimizer, schedule and loss of a training recipe (plain torch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.config.schema import RecipeConfig


def make_optimizer(model: nn.Module, recipe: RecipeConfig) -> torch.optim.Optimizer:
    """SGD with weight decay on weight matrices and kernels only: 1-D parameters (LSQ step sizes, BN
    affine parameters, biases) get none, as in the reference (docs/method.md §3), so decay does not shrink the
    step sizes that serve as indicators."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.dim() > 1]
    undecayed = [p for p in trainable if p.dim() <= 1]
    groups = [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return torch.optim.SGD([group for group in groups if group["params"]], lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


def lr_factor(recipe: RecipeConfig, steps_per_epoch: int, step: int) -> float:
    """Multiplier of `recipe.lr` for the optimizer step `step` (0-based): linear warm-up per step over
    `warmup_epochs`, then cosine (ending at `min_lr`), step (x0.1 at 1/3 and 2/3) or constant. With
    `scheduler_interval: epoch` the value after warm-up changes only at epoch boundaries, like the
    reference's per-epoch CosineAnnealingLR(T_max=epochs, eta_min=min_lr)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(recipe.warmup_epochs * steps_per_epoch, total - 1)
    if step < warmup:
        return (step + 1) / warmup
    if recipe.scheduler_interval == "epoch":
        epochs_after_warmup = max(1, recipe.epochs - recipe.warmup_epochs)
        progress = (step - warmup) // steps_per_epoch / epochs_after_warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(progress, 1.0)
    if recipe.scheduler == "cosine":
        floor = min(recipe.min_lr / recipe.lr, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if recipe.scheduler == "step":
        return 0.1 ** int(progress * 3)
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler the training loop steps after every optimizer step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, steps_per_epoch, step))


def make_criterion(recipe: RecipeConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
