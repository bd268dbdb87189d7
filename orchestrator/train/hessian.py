"""Hessian-trace sensitivity (HAWQ-V2/V3): a second way to score (layer, bit-width) pairs for the ILP.

For every searchable layer l, with the full-precision model and a few training batches:

    I_w(l, b) = Tr(H_W_l) * mean((Q_b(W_l) - W_l)^2)
    I_a(l, b) = Tr(H_x_l) * mean((Q_b(x_l) - x_l)^2)

H_W_l is the Hessian of the loss (plain cross-entropy, the batch mean) w.r.t. the layer's weights,
H_x_l w.r.t. the input the layer reads (the batch of activations its input quantizer would see). Both
traces come from Hutchinson's estimator, Tr(H) = E[v^T H v] over Rademacher vectors v, with H v from
a double backward, one per tensor: the product with the diagonal block alone (the gradient of
grad_l . v w.r.t. that tensor only), as HAWQ computes block traces. One product of the whole Hessian
with a vector over all tensors would give every block's estimate at once, but its cross terms,
zero only in expectation, swamp a flat layer's estimate next to a sharp one. Tr(H) * mean(d^2) is
2 E[loss increase] under a perturbation d of that size with random signs, so the weight and the
activation scores are in the same unit and add up (alpha = 1 weighs them equally); HAWQ-V2 writes
the weight term as Tr(H)/n * ||Q(W) - W||^2, the same number.

Q_b is the layer's own LSQ quantizer at its initial step size (docs/method.md §2.1): weights
s = max(|mean - 3 std|, |mean + 3 std|) / 2^(b-1), activations s = 2 mean|x| / sqrt(Qp) on the first
batch (sign from that batch), as fine-tuning without indicator initialisation starts. Traces are
averaged over batches and Hutchinson samples; a negative average (the loss is not locally convex along
that layer) is taken as 0: no predicted loss increase, so the layer's entries tie at 0.

The model is the joint model built from the FP weights with its quantizers switched off, in eval mode
(BatchNorm on running statistics, no dropout): the FP network, with the searchable layers' names
and quantizers in place. The products of attention operands (docs/method.md §7) are not scored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.common.seeds import derived_seed
from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import DatasetIndex
from orchestrator.data.local import split_dataset
from orchestrator.data.transforms import transforms_for
from orchestrator.quant.policy import searchable_modules
from orchestrator.search.indicators import Indicators
from orchestrator.train.oneshot import loader_batches
from orchestrator.train.stages import device_for, joint_from_fp

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Sums:
    trace_w: torch.Tensor  # per layer, sums over batches x samples of v^T H v
    trace_a: torch.Tensor
    trace_w_sq: torch.Tensor  # of squares, for the standard error
    trace_a_sq: torch.Tensor
    act_mse: dict[str, dict[int, float]]  # layer -> bit -> sum over batches of the mean squared perturbation
    batches: int = 0
    estimates: int = 0


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.device, like.dtype) * 2 - 1)


def _block_quadratic(grad: torch.Tensor, tensor: torch.Tensor, generator: torch.Generator) -> float:
    """v^T H v for the Hessian block of `tensor` alone (H v = d(grad . v)/d tensor), v Rademacher: an
    unbiased estimate of that block's trace, never negative where the block is positive semi-definite."""
    vector = _rademacher(grad, generator)
    if not grad.requires_grad:  # the loss is linear in `tensor` here: a zero block
        return 0.0
    (product,) = torch.autograd.grad(grad, tensor, grad_outputs=vector, retain_graph=True, allow_unused=True)
    return 0.0 if product is None else float((vector * product).sum())


@torch.no_grad()
def _quantization_mse(quantizer, tensor: torch.Tensor, bits: int) -> float:
    """mean((Q_b(t) - t)^2) with `quantizer` (an LsqQuantizer) at `bits`: its step size initialises on
    the first tensor it sees at those bits and stays; the quantizer is left switched off."""
    quantizer.active_bits = bits
    try:
        return float((quantizer(tensor) - tensor).square().mean())
    finally:
        quantizer.active_bits = None


def hessian_indicators(model: nn.Module, batches: Batches, bits: list[int], samples: int, seed: int,
                       arch: str = "", provenance: dict | None = None) -> Indicators:
    """Hessian-trace sensitivities of the joint model `model` (quantizers off: `joint_from_fp`) over
    `batches` of (images, labels) on its device, `samples` Hutchinson vectors per batch drawn from
    `seed`; an `Indicators` the ILP reads like learned step sizes. Provenance records the traces."""
    if samples < 1:
        raise ValueError("hessian_indicators needs at least one Hutchinson sample per batch")
    layers = searchable_modules(model)
    names = [name for name, _ in layers]
    for _, module in layers:
        module.set_bits(None, None)  # the FP function; the quantizers serve only to measure Q_b
    weights = [module.weight for _, module in layers]
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args):
            # the layer's own copy of its input: the Hessian of what its input quantizer would change,
            # not of a tensor shared with another layer (a ResNet block's conv1 and downsample)
            inputs[name] = args[0].clone()
            return (inputs[name], *args[1:])
        return hook

    zeros = torch.zeros(len(layers), dtype=torch.float64)
    sums = _Sums(zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone(), {name: dict.fromkeys(bits, 0.0) for name in names})
    hooks = [module.register_forward_pre_hook(capture(name)) for name, module in layers]
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            inputs.clear()
            loss = criterion(model(images), labels)
            activations = [inputs[name] for name in names]
            tensors = weights + activations
            grads = torch.autograd.grad(loss, tensors, create_graph=True)
            for _ in range(samples):
                quadratic = torch.tensor([_block_quadratic(grad, tensor, generator) for grad, tensor in zip(grads, tensors)],
                                         dtype=torch.float64)
                for total, squares, part in ((sums.trace_w, sums.trace_w_sq, quadratic[:len(layers)]),
                                             (sums.trace_a, sums.trace_a_sq, quadratic[len(layers):])):
                    total += part
                    squares += part.square()
                sums.estimates += 1
            for (name, module), activation in zip(layers, activations):
                for b in bits:
                    sums.act_mse[name][b] += _quantization_mse(module.act_quant, activation.detach(), b)
            sums.batches += 1
            del grads, loss, activations, tensors
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if sums.batches == 0:
        raise ValueError("hessian_indicators got no batches")
    return _indicators(layers, bits, sums, arch, provenance, samples)


def _indicators(layers, bits: list[int], sums: _Sums, arch: str, provenance: dict | None, samples: int) -> Indicators:
    n = sums.estimates
    mean_w, mean_a = sums.trace_w / n, sums.trace_a / n
    # standard error of each mean trace (over all batch x sample estimates), to judge convergence
    stderr_w = ((sums.trace_w_sq / n - mean_w.square()).clamp(min=0) / max(n - 1, 1)).sqrt()
    stderr_a = ((sums.trace_a_sq / n - mean_a.square()).clamp(min=0) / max(n - 1, 1)).sqrt()
    weight, act = {}, {}
    for index, (name, module) in enumerate(layers):
        trace_w, trace_a = max(float(mean_w[index]), 0.0), max(float(mean_a[index]), 0.0)
        weight[name] = {b: trace_w * _quantization_mse(module.weight_quant, module.weight.detach(), b) for b in bits}
        act[name] = {b: trace_a * sums.act_mse[name][b] / sums.batches for b in bits}
    names = [name for name, _ in layers]
    traces = {"weight": {name: float(mean_w[i]) for i, name in enumerate(names)},
              "act": {name: float(mean_a[i]) for i, name in enumerate(names)},
              "weight_stderr": {name: float(stderr_w[i]) for i, name in enumerate(names)},
              "act_stderr": {name: float(stderr_a[i]) for i, name in enumerate(names)}}
    return Indicators(model=arch, bits=list(bits), layers=names, weight=weight, act=act,
                      provenance={**(provenance or {}), "scores": "hessian", "batches": sums.batches,
                                  "hutchinson_samples": samples, "hessian_trace": traces})


def hessian_scores(cfg: PipelineConfig, dataset: DatasetIndex, fp_state: dict,
                   provenance: dict | None = None) -> Indicators:
    """`hessian_indicators` of a config's FP weights at its candidate bits (`indicators.bits`), on
    `search.hessian_batches` seeded batches of the training subset indicator training reads, through
    the eval transform (the network's function, not augmentation noise, is what is measured)."""
    device = device_for(cfg.ray.use_gpu)
    model = joint_from_fp(cfg.model, cfg.indicators.bits, fp_state).to(device)
    _, evaluation = transforms_for(cfg.data, cfg.model.input_size)
    train_set = split_dataset(dataset, "train", evaluation, cfg.seed, cfg.indicators.train_fraction)
    batches = loader_batches(train_set, cfg.data.batch_size, derived_seed(cfg.seed, "hessian-batches"),
                             cfg.search.hessian_batches, shuffle=True, device=device)
    return hessian_indicators(model, batches, list(cfg.indicators.bits), cfg.search.hessian_samples,
                              derived_seed(cfg.seed, "hutchinson"), arch=cfg.model.arch, provenance=provenance)
