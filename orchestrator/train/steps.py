"""One optimisation step of each stage, and evaluation (plain torch)."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.quant.policy import (
    BitAssignment,
    random_policy,
    set_policy,
    set_uniform_bits,
)
from orchestrator.train.compiled import CompiledPass


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


def forward_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
                 bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one training pass: what the eager pass runs and what `CompiledPass` compiles."""
    with _autocast(images.device, bf16):
        logits = model(images)
        loss = criterion(logits.float(), labels)
    return logits, loss


def _forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
                      bf16: bool, compiled: CompiledPass | None) -> tuple[float, int]:
    outputs = compiled.forward_backward(images, labels) if compiled is not None and compiled.serves(images) else None
    if outputs is None:
        outputs = forward_loss(model, images, labels, criterion, bf16)
        outputs[1].backward()
    logits, loss = outputs
    return float(loss.detach()), _topk_correct(logits.detach(), labels, 1)


def _finish_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
    if grad_clip is not None:
        nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    optimizer.step()


def plain_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, grad_clip: float | None = None, bf16: bool = False,
               compiled: CompiledPass | None = None) -> dict[str, float]:
    """One step of ordinary training (FP stage, or fine-tuning at a fixed policy); `compiled`: the
    model's compiled pass, used where it serves the batch."""
    optimizer.zero_grad(set_to_none=True)
    loss, correct = _forward_backward(model, images, labels, criterion, bf16, compiled)
    _finish_step(model, optimizer, grad_clip)
    return {"loss": loss, "top1": correct / len(labels)}


class NanLossError(UserError):
    """Indicator training diverged: the message names the step, the pass and what to change."""


# optimizer -> joint steps it has taken in this process, to name the step a NaN loss appeared at
_joint_steps: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()


def _check_finite(loss: float, optimizer: torch.optim.Optimizer, where: str) -> None:
    if math.isnan(loss) or math.isinf(loss):
        step = _joint_steps.get(optimizer, 0) + 1
        lr = optimizer.param_groups[0]["lr"]
        raise NanLossError(f"indicators: loss is {'NaN' if math.isnan(loss) else 'infinite'} at step {step} "
                           f"(counted since this worker started; {where} pass, lr {lr:.3g}); lower indicators.lr "
                           "or keep indicators.grad_clip set, and check the FP weights")


def _drop_zero_gradients(model: nn.Module) -> None:
    """Parameters whose gradient is exactly zero sit out the optimizer step (docs/method.md §3.1, as the
    reference): momentum does not move a step size that clamp's gradient froze."""
    for parameter in model.parameters():
        if parameter.grad is not None and not parameter.grad.any():
            parameter.grad = None


def joint_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bits: Sequence[int],
               criterion: nn.Module, optimizer: torch.optim.Optimizer, policy_rng: random.Random,
               grad_clip: float | None = 1.0, bf16: bool = False,
               compiled: CompiledPass | None = None) -> dict[str, float]:
    """docs/method.md §3: one pass per uniform bit-width plus one random-policy pass, gradients accumulated,
    clipped by value, parameters with an all-zero gradient left out, then a single optimizer step.
    Metrics per pass: loss_w{b}, top1_w{b}, loss_random, top1_random. A NaN or infinite loss raises
    `NanLossError` before any weight changes. `compiled`: the model's compiled pass, used by every
    pass it serves (one graph for all bit-widths and policies)."""
    optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {}
    for b in bits:
        set_uniform_bits(model, b)
        loss, correct = _forward_backward(model, images, labels, criterion, bf16, compiled)
        _check_finite(loss, optimizer, f"W{b}A{b}")
        metrics[f"loss_w{b}"], metrics[f"top1_w{b}"] = loss, correct / len(labels)
    set_policy(model, random_policy(model, bits, policy_rng))
    loss, correct = _forward_backward(model, images, labels, criterion, bf16, compiled)
    _check_finite(loss, optimizer, "random-policy")
    metrics["loss_random"], metrics["top1_random"] = loss, correct / len(labels)
    if grad_clip is not None:
        nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    _drop_zero_gradients(model)
    optimizer.step()
    _joint_steps[optimizer] = _joint_steps.get(optimizer, 0) + 1
    return metrics


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], criterion: nn.Module,
             policy: BitAssignment | None = None, bf16: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 (fractions) over `batches`, at `policy` when given."""
    return evaluate_policies(model, batches, criterion, {"": policy}, bf16)[""]


@torch.no_grad()
def evaluate_policies(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], criterion: nn.Module,
                      policies: Mapping[str, BitAssignment | None], bf16: bool = False) -> dict[str, dict[str, float]]:
    """`evaluate` at several policies over one pass of `batches`: each batch is decoded once and
    scored at every policy. Returns {name: {loss, top1, top5, samples}}."""
    was_training = model.training
    model.eval()
    sums = {name: [0.0, 0, 0] for name in policies}
    total = 0
    try:
        for images, labels in batches:
            for name, policy in policies.items():
                if policy is not None:
                    set_policy(model, policy)
                with _autocast(images.device, bf16):
                    logits = model(images).float()
                sums[name][0] += float(criterion(logits, labels)) * len(labels)
                sums[name][1] += _topk_correct(logits, labels, 1)
                sums[name][2] += _topk_correct(logits, labels, 5)
            total += len(labels)
    finally:
        model.train(was_training)
    if total == 0:
        return {name: {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "samples": 0}
                for name in policies}
    return {name: {"loss": loss / total, "top1": top1 / total, "top5": top5 / total, "samples": total}
            for name, (loss, top1, top5) in sums.items()}
