"""Bit control of a quantized model and reading its learned step sizes (the indicators)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from orchestrator.search.indicators import Indicators
from orchestrator.quant.modules import QConv2d, QLinear, SwitchableBatchNorm2d
from orchestrator.quant.surgery import layout_of, unwrap

# Searchable layer -> (weight bits, activation bits): a policy as bit control sees it (the searched policy
# document with its totals is `orchestrator.search.policy.Policy`; its `assignment()` gives this).
BitAssignment = Mapping[str, tuple[int, int]]


def searchable_modules(model: nn.Module) -> list[tuple[str, QConv2d | QLinear]]:
    inner = unwrap(model)
    return [(name, inner.get_submodule(name)) for name in layout_of(inner).searchable]


def set_policy(model: nn.Module, policy: BitAssignment) -> None:
    """Set each searchable layer to its (wbits, abits); its switchable BN follows the weight bits, the
    products of an attention tied to it (docs/method.md §7) its activation bits."""
    inner = unwrap(model)
    layout = layout_of(inner)
    for name in layout.searchable:
        wbits, abits = policy[name]
        inner.get_submodule(name).set_bits(wbits, abits)
        if name in layout.bn_of:
            bn = inner.get_submodule(layout.bn_of[name])
            assert isinstance(bn, SwitchableBatchNorm2d)
            bn.active_bits = wbits
    for attention, layer in layout.operand_quant_of.items():
        inner.get_submodule(attention).operand_quant.set_bits(policy[layer][1])


def uniform_policy(model: nn.Module, bits: int) -> dict[str, tuple[int, int]]:
    return {name: (bits, bits) for name in layout_of(model).searchable}


def set_uniform_bits(model: nn.Module, bits: int) -> None:
    set_policy(model, uniform_policy(model, bits))


def random_policy(model: nn.Module, bits: Sequence[int], rng: random.Random) -> dict[str, tuple[int, int]]:
    """The random pass of docs/method.md §3.2: each searchable convolution draws one bit-width for both
    weights and activations; a searchable Linear keeps the last uniform pass's bit-width (bits[-1]),
    except a Linear applied per token (a transformer's projections and MLPs, ConvNeXt's pointwise
    layers: 1x1 convolutions in all but name), which draws like a convolution. Without that, a
    transformer's random pass would repeat the last uniform one."""
    token_wise = layout_of(model).token_wise
    policy = {}
    for name, module in searchable_modules(model):
        b = rng.choice(list(bits)) if isinstance(module, QConv2d) or name in token_wise else bits[-1]
        policy[name] = (b, b)
    return policy


def extract_indicators(model: nn.Module, arch: str, provenance: dict[str, Any] | None = None) -> Indicators:
    """The learned step sizes s_w[l][b], s_a[l][b] of every searchable layer (docs/method.md §4)."""
    layers = searchable_modules(model)
    bits = list(layers[0][1].weight_quant.bits)
    weight, act = {}, {}
    for name, module in layers:
        weight[name] = {b: module.weight_quant.step_size(b) for b in bits}
        act[name] = {b: module.act_quant.step_size(b) for b in bits} if module.act_quant is not None else {}
    return Indicators(
        model=arch, bits=bits, layers=[name for name, _ in layers], weight=weight, act=act,
        provenance=dict(provenance or {}),
    )


def load_step_sizes(model: nn.Module, source: nn.Module, policy: BitAssignment) -> None:
    """Start a fine-tuning model's quantizers from a joint-trained one: for each searchable layer the
    step sizes at its chosen bits and the matching BatchNorm copy (the one of its weight bits), and an
    attention's operand quantizers at its tied layer's activation bits. Fixed
    layers are full precision in the joint model, so their 8-bit step sizes initialise on the first
    fine-tuning batch. Weights stay as they are."""
    target_inner, source_inner = unwrap(model), unwrap(source)
    target_layout, source_layout = layout_of(target_inner), layout_of(source_inner)
    for name in target_layout.searchable:
        wbits, abits = policy[name]
        target, joint = target_inner.get_submodule(name), source_inner.get_submodule(name)
        _copy_step(target.weight_quant, joint.weight_quant, wbits)
        if target.act_quant is not None and joint.act_quant is not None:
            _copy_step(target.act_quant, joint.act_quant, abits)
        bn_name = source_layout.bn_of.get(name)
        if bn_name is not None:
            joint_bn = source_inner.get_submodule(bn_name)
            target_inner.get_submodule(bn_name).load_state_dict(joint_bn.copies[str(wbits)].state_dict())
    for attention, layer in target_layout.operand_quant_of.items():
        if attention in source_layout.operand_quant_of:
            targets = target_inner.get_submodule(attention).operand_quant.quantizers()
            sources = source_inner.get_submodule(attention).operand_quant.quantizers()
            for target, joint in zip(targets, sources):
                _copy_step(target, joint, policy[layer][1])


def _copy_step(target, source, bits: int) -> None:
    index = source.bits.index(bits)
    target.step[str(bits)].data.copy_(source.step[str(bits)].data)
    target.initialized[target.bits.index(bits)] = source.initialized[index]
    target.signed_state.copy_(source.signed_state)
