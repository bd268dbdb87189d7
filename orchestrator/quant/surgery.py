"""Turn a torchvision classifier into its quantizable form (docs/method.md §2.3).

Searchable layers become QConv2d/QLinear with one step size per candidate bit-width for weights and
inputs; the BatchNorm that consumes a searchable layer's output becomes switchable. Modules that read a
weight functionally are first made to call it as a layer (orchestrator.models.explicit_layers), so those
weights are quantized too, and their products of two activations (attention's q @ k^T and attn @ v)
take both operands at the activation bits of the attention's output projection (docs/method.md §7). Fixed layers
(default: first conv and classifier) stay full precision in the joint (indicator-training) model, as in
the reference; at a fixed policy (fine-tuning, deployment) they quantize at 8 bits: the first conv keeps
a full-precision input, the classifier uses 8-bit activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.models.explicit_layers import attention_ties, make_weights_explicit
from orchestrator.models.info import split_layers, trace_layers
from orchestrator.quant.modules import OperandQuant, QConv2d, QLinear, SwitchableBatchNorm2d

FIXED_BITS = 8


@dataclass(frozen=True)
class QuantLayout:
    """Which layers of a quantized model are searched, in forward order, and the BN each feeds."""

    searchable: tuple[str, ...]
    fixed: tuple[str, ...]
    bn_of: Mapping[str, str]  # searchable layer -> its switchable BatchNorm
    first_conv: str | None
    # searchable Linear layers applied per token (more than one position at batch 1): 1x1 convolutions
    # in all but name, which the joint step's random pass treats as convolutions
    token_wise: frozenset[str] = frozenset()
    # attention module -> the searchable layer whose activation bits its OperandQuant follows
    operand_quant_of: Mapping[str, str] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar `.module`) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def layout_of(model: nn.Module) -> QuantLayout:
    layout = getattr(unwrap(model), "limpq_layout", None)
    if layout is None:
        raise TypeError("model has not been prepared by quantize_model()")
    return layout


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    bits: Sequence[int] | None = None,
    input_size: int = 224,
    fixed_layers: Sequence[str] | None = None,
    policy: Mapping[str, tuple[int, int]] | None = None,
) -> QuantLayout:
    """Replace layers of `model` in place and attach its `QuantLayout` as `model.limpq_layout`.

    Either `bits` (joint training: every searchable layer holds all candidates, BN is switchable)
    or `policy` (fine-tuning: layer -> (wbits, abits), one step size each, plain BN).
    """
    if (bits is None) == (policy is None):
        raise ValueError("give exactly one of bits= or policy=")
    make_weights_explicit(model)
    traced = trace_layers(model, input_size)
    searchable, fixed = split_layers(traced, list(fixed_layers) if fixed_layers is not None else None)
    if policy is not None:
        names = [layer.name for layer in searchable]
        missing = [n for n in names if n not in policy]
        extra = [n for n in policy if n not in set(names)]
        if missing or extra:
            raise UserError(
                f"policy does not match the model's searchable layers: missing {missing or 'none'}, extra {extra or 'none'}"
            )
    first_conv = next((layer.name for layer in traced if layer.kind == "conv"), None)
    bn_of: dict[str, str] = {}
    for layer in searchable:
        module = model.get_submodule(layer.name)
        wbits, abits = ([policy[layer.name][0]], [policy[layer.name][1]]) if policy else (list(bits), list(bits))
        quantized = (QConv2d if layer.kind == "conv" else QLinear).from_float(module, wbits, abits)
        _replace(model, layer.name, quantized)
        if bits is not None and layer.bn_name is not None:
            _replace(model, layer.bn_name, SwitchableBatchNorm2d(model.get_submodule(layer.bn_name), bits))
            bn_of[layer.name] = layer.bn_name
    for layer in fixed if policy is not None else ():
        module = model.get_submodule(layer.name)
        abits = None if layer.name == first_conv else [FIXED_BITS]
        _replace(model, layer.name, (QConv2d if layer.kind == "conv" else QLinear).from_float(module, [FIXED_BITS], abits))
    searchable_names = {layer.name for layer in searchable}
    fixed_names = {layer.name for layer in fixed}
    operand_quant_of: dict[str, str] = {}
    for name, tie in attention_ties(model).items():
        attention = model.get_submodule(name)
        device = next(attention.parameters()).device
        if tie in searchable_names:
            attention.operand_quant = OperandQuant([policy[tie][1]] if policy else list(bits)).to(device)
            operand_quant_of[name] = tie
        elif tie in fixed_names and policy is not None:  # as its fixed layer: float in joint training, else 8 bits
            attention.operand_quant = OperandQuant([FIXED_BITS]).to(device)
    layout = QuantLayout(
        searchable=tuple(layer.name for layer in searchable),
        fixed=tuple(layer.name for layer in fixed),
        bn_of=bn_of,
        first_conv=first_conv,
        token_wise=frozenset(layer.name for layer in searchable if layer.kind == "linear" and layer.tokens > 1),
        operand_quant_of=operand_quant_of,
    )
    # at a policy every quantizer holds one bit-width, which is its active one from the start
    model.limpq_layout = layout
    return layout
