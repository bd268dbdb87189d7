"""One-shot policy scoring with the joint model (docs/method.md §9): any per-layer policy is run on the
indicator-training model directly, without fine-tuning. Plain torch (layer 1: no Ray, no MLflow).

Each searchable layer uses its step sizes at the chosen (weight, activation) bits and the BatchNorm
copy of its weight bits. Joint training only ever ran a layer with weights and activations at the same
bit-width b, so BN copy b saw outputs of a b-bit kernel; when w != a the weight bits decide, because the
copy's statistics (per output channel) follow the quantized kernel far more than the input grid, and the
fine-tuning stage starts from the same copy (`load_step_sizes`). Optionally the BN statistics in use are
recalibrated on a few training batches before scoring (see `score_policy`); the model's own BN state is
restored afterwards, so policies scored one after another do not influence each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orchestrator.common.errors import UserError
from orchestrator.quant.policy import BitAssignment, set_policy
from orchestrator.quant.surgery import layout_of, unwrap
from orchestrator.search.costs import CostTable
from orchestrator.search.policy import PolicyTotals, policy_totals
from orchestrator.train.steps import evaluate

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def joint_candidates(model: nn.Module) -> tuple[int, ...]:
    """The candidate bit-widths the joint model holds step sizes for."""
    first = unwrap(model).get_submodule(layout_of(model).searchable[0])
    return first.weight_quant.bits


def check_policy(model: nn.Module, policy: Mapping[str, tuple[int, int]], source: str = "policy") -> None:
    """UserError (one line, naming `source`) unless `policy` sets every searchable layer of the joint
    model, names no other layer, and uses only its candidate bit-widths."""
    names = list(layout_of(model).searchable)
    missing = [name for name in names if name not in policy]
    extra = [name for name in policy if name not in set(names)]
    if missing or extra:
        def shown(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "") if items else "none"

        raise UserError(f"{source}: layers do not match the model's {len(names)} searchable layers: "
                        f"missing {shown(missing)}; unknown {shown(extra)}")
    bits = joint_candidates(model)
    for name in names:
        wbits, abits = policy[name]
        if wbits not in bits or abits not in bits:
            raise UserError(f"{source}: layer {name} asks for W{wbits}A{abits}; the joint model has step sizes for "
                            f"bits {', '.join(map(str, bits))} only (indicators.bits)")


def policy_cost(costs: CostTable, policy: Mapping[str, tuple[int, int]]) -> PolicyTotals:
    """BitOps, size and the other totals of `policy` from the model's cost table (not from any file)."""
    wbits = [policy[layer.name][0] for layer in costs.searchable]
    abits = [policy[layer.name][1] for layer in costs.searchable]
    return policy_totals(costs, wbits, abits)


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches) -> int:
    """Replace the running statistics of every BatchNorm by their exact average over `batches` (forward
    passes in train mode at the policy set, no weight changes); copies the policy does not use are reset
    and stay unused. A batch of one image is left out: BatchNorm cannot take statistics over it where
    the feature map is 1x1. Returns the samples seen."""
    modules = _bn_modules(model)
    momenta = [bn.momentum for bn in modules]
    for bn in modules:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average instead of an exponential one
    was_training = model.training
    model.train()
    seen = 0
    try:
        for images, _ in batches:
            if len(images) > 1:
                model(images)
                seen += len(images)
    finally:
        model.train(was_training)
        for bn, momentum in zip(modules, momenta):
            bn.momentum = momentum
    if seen == 0:
        raise UserError("BN recalibration got no training batches")
    return seen


def score_policy(model: nn.Module, policy: BitAssignment, batches: Batches, criterion: nn.Module | None = None,
                 calibration_batches: Batches | None = None, bf16: bool = False) -> dict[str, float]:
    """{"top1", "loss", "samples"} of the joint model at `policy` over `batches` (top-1 as a fraction;
    loss with `criterion`, default the plain cross-entropy). With `calibration_batches`, BatchNorm
    statistics are recomputed on them first; every BatchNorm's state is restored before returning."""
    check_policy(model, policy)
    criterion = criterion or nn.CrossEntropyLoss()
    set_policy(model, policy)
    saved = None
    if calibration_batches is not None:
        saved = [{key: value.clone() for key, value in bn.state_dict().items()} for bn in _bn_modules(model)]
        recalibrate_bn(model, calibration_batches)
    try:
        result = evaluate(model, batches, criterion, bf16=bf16)
    finally:
        if saved is not None:
            for bn, state in zip(_bn_modules(model), saved):
                bn.load_state_dict(state)
    return {"top1": result["top1"], "loss": result["loss"], "samples": result["samples"]}


def loader_batches(dataset: Dataset, batch_size: int, seed: int, count: int | None = None, shuffle: bool = False,
                   device: torch.device | str = "cpu") -> Batches:
    """(images, labels) batches of `dataset` on `device`: in order, or shuffled in an order fixed by
    `seed`; at most `count` of them."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
    for index, (images, labels) in enumerate(loader):
        if count is not None and index >= count:
            return
        yield images.to(device), labels.to(device)


@dataclass(frozen=True)
class ScoringData:
    """What one-shot scoring reads: every sample of `val`; with `calibration_batches` > 0, that many
    `train` batches per policy for BN recalibration, in an order fixed by `seed` (the same batches for
    every policy)."""

    train: Dataset
    val: Dataset
    batch_size: int
    seed: int
    calibration_batches: int = 0
    device: torch.device | str = "cpu"

    def validation(self) -> Batches:
        return loader_batches(self.val, self.batch_size, self.seed, device=self.device)

    def calibration(self) -> Batches | None:
        if not self.calibration_batches:
            return None
        return loader_batches(self.train, self.batch_size, self.seed, self.calibration_batches, shuffle=True,
                              device=self.device)


def score_policies(model: nn.Module, policies: Sequence[tuple[str, BitAssignment]], costs: CostTable,
                   data: ScoringData, criterion: nn.Module | None = None, bf16: bool = False) -> list[dict]:
    """One row per (label, policy): {"policy", "bitops_g", "size_mb", "top1", "loss", "samples"}, the
    model moved to `data.device`; every policy is checked (naming its label) before any is scored."""
    for label, policy in policies:
        check_policy(model, policy, label)
    model = model.to(data.device)
    rows = []
    for label, policy in policies:
        totals = policy_cost(costs, policy)
        score = score_policy(model, policy, data.validation(), criterion, data.calibration(), bf16)
        rows.append({"policy": label, "bitops_g": totals.bitops_g, "size_mb": totals.size_mb, **score})
    return rows
