"""Hessian-trace sensitivities (orchestrator.train.hessian): Hutchinson's estimate agrees with the exact
trace, the scores are larger for a layer whose quantization hurts more (a constructed case), and they
drive the same ILP as the learned indicators."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config.schema import Budget
from orchestrator.models.info import trace_layers
from orchestrator.quant.surgery import quantize_model
from orchestrator.search.costs import costs_from_layers
from orchestrator.search.ilp import Searcher
from orchestrator.search.indicators import load_indicators, non_monotonic, save_indicators
from orchestrator.train.hessian import hessian_indicators

BITS = [4, 3, 2]


class TwoBranches(nn.Module):
    """stem -> relu -> (gain_a * relu(a(h)) + gain_b * relu(b(h))) -> mean -> fc. Branches a and b have
    the same weights; the gains make a's errors reach the loss gain_a / gain_b times larger."""

    def __init__(self, gain_a: float, gain_b: float, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)  # fixed: the first conv
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, classes)  # fixed: the classifier
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)
        self.gain_a, self.gain_b = gain_a, gain_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        y = self.gain_a * F.relu(self.a(h)) + self.gain_b * F.relu(self.b(h))
        return self.fc(y.mean((2, 3)))


def joint(gain_a: float, gain_b: float, channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = TwoBranches(gain_a, gain_b, channels)
    quantize_model(model, bits=BITS, input_size=8)
    return model


def batches(count: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def exact_weight_trace(model: nn.Module, layer: str, data) -> float:
    """sum_i e_i^T H e_i of the batch-mean cross-entropy w.r.t. the layer's weights, averaged over batches."""
    weight = model.get_submodule(layer).weight
    total = 0.0
    for images, labels in data:
        (grad,) = torch.autograd.grad(F.cross_entropy(model(images), labels), weight, create_graph=True)
        flat = grad.reshape(-1)
        total += sum(float(torch.autograd.grad(flat[i], weight, retain_graph=True)[0].reshape(-1)[i])
                     for i in range(flat.numel()))
    return total / len(data)


def test_hutchinson_trace_matches_the_exact_trace_within_its_standard_error() -> None:
    model = joint(1.0, 1.0, channels=2)  # 36 weights a layer: 36 exact second derivatives each
    data = batches(count=1)
    scores = hessian_indicators(model, data, BITS, samples=64, seed=0)
    traces = scores.provenance["hessian_trace"]
    for layer in ("a", "b"):
        exact = exact_weight_trace(model, layer, data)
        assert exact > 0
        assert abs(traces["weight"][layer] - exact) < 4 * traces["weight_stderr"][layer] + 1e-9, (layer, exact)
    # the model is left as found: training mode, quantizers off (the FP function)
    assert model.training and model.a.weight_quant.active_bits is None and model.a.act_quant.active_bits is None


def test_scores_are_finite_monotonic_and_larger_where_quantization_hurts_more(tmp_path) -> None:
    model = joint(4.0, 0.25)
    data = batches()
    scores = hessian_indicators(model, data, BITS, samples=8, seed=0, arch="two-branches")
    assert scores.layers == ["a", "b"] and scores.provenance["scores"] == "hessian"
    for table in (scores.weight, scores.act):
        for layer in ("a", "b"):
            values = [table[layer][b] for b in BITS]
            assert all(torch.isfinite(torch.tensor(values))) and min(values) > 0
            assert values == sorted(values)  # more bits, smaller perturbation, smaller score
            # a's errors reach the loss 16x amplified: its curvature is 256x b's
        assert all(table["a"][b] > 50 * table["b"][b] for b in BITS)
    assert non_monotonic(scores) == []

    # what the scores predict is so: quantizing a's weights alone at 2 bits costs more loss than b's
    def loss_with_2bit_weights(layer: str | None) -> float:
        if layer is not None:
            model.get_submodule(layer).weight_quant.active_bits = 2
        try:
            with torch.no_grad():
                return sum(float(F.cross_entropy(model.eval()(x), y)) for x, y in data)
        finally:
            if layer is not None:
                model.get_submodule(layer).weight_quant.active_bits = None
    fp = loss_with_2bit_weights(None)
    assert loss_with_2bit_weights("a") - fp > 10 * abs(loss_with_2bit_weights("b") - fp)

    # the same file format as learned indicators
    save_indicators(scores, tmp_path / "hessian.json")
    again = load_indicators(tmp_path / "hessian.json")
    assert again.weight == scores.weight and again.provenance["scores"] == "hessian"


def test_hessian_scores_drive_the_same_ilp_under_a_budget() -> None:
    model = joint(4.0, 0.25)
    scores = hessian_indicators(model, batches(), BITS, samples=8, seed=0)
    torch.manual_seed(0)
    costs = costs_from_layers(trace_layers(TwoBranches(4.0, 0.25), 8), model="two-branches", input_size=8)
    assert costs.names == ["a", "b"]
    policy = Searcher(scores, costs, alpha=1.0).solve(Budget(avg_wbits=3, avg_abits=3))
    # the layer whose quantization hurts more keeps the bits
    assert [(layer.name, layer.wbits, layer.abits) for layer in policy.layers] == [("a", 4, 4), ("b", 2, 2)]
    assert policy.totals.size_mb > 0
