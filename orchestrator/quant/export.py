"""Export of a fine-tuned quantized model: integer weight codes and step sizes per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.quant.lsq import levels
from orchestrator.quant.modules import OperandQuant, QConv2d, QLinear
from orchestrator.quant.surgery import layout_of, unwrap


@torch.no_grad()
def export_quantized(model: nn.Module) -> dict[str, Any]:
    """{"layers": {name: {...}}, "products": {...}, "float": {...}} where each quantized layer holds
    `weight_codes` (int8 for bits <= 8), `weight_step`, `wbits`, and its input quantizer's `abits`,
    `act_step`, `act_signed` (None for a full-precision input). Dequantized weight = codes * step.
    "products" holds, per attention module whose products of two activations run quantized, the `abits`
    and the step size and sign of each operand (q, k, probs, v). Everything else (BatchNorm, biases) is
    kept in float under "float"."""
    inner = unwrap(model)
    layout = layout_of(inner)
    layers: dict[str, Any] = {}
    for name in (*layout.fixed, *layout.searchable):
        module = inner.get_submodule(name)
        assert isinstance(module, (QConv2d, QLinear))
        wq = module.weight_quant
        wbits = wq.active_bits
        step = wq.effective_step_size(wbits)
        qn, qp = levels(wbits, signed=True)
        codes = torch.clamp(module.weight / step, qn, qp).round().to(torch.int8)
        entry: dict[str, Any] = {"wbits": wbits, "weight_codes": codes, "weight_step": step,
                                 "searchable": name in layout.searchable}
        aq = module.act_quant
        if aq is not None:
            entry.update(abits=aq.active_bits, act_step=aq.effective_step_size(aq.active_bits), act_signed=aq.signed)
        else:
            entry.update(abits=None, act_step=None, act_signed=None)
        layers[name] = entry
    products: dict[str, Any] = {}
    for name, module in inner.named_modules():
        if isinstance(module, OperandQuant):
            bits = module.q.active_bits
            products[name.removesuffix(".operand_quant")] = {
                "abits": bits, **{f"{operand}_step": quantizer.effective_step_size(bits)
                                  for operand, quantizer in zip(module.OPERANDS, module.quantizers())},
                **{f"{operand}_signed": quantizer.signed for operand, quantizer in zip(module.OPERANDS, module.quantizers())}}
    quantized = {f"{name}.weight" for name in layers}
    floats = {key: value for key, value in inner.state_dict().items()
              if key not in quantized and not any(part in key for part in (".weight_quant.", ".act_quant.", "operand_quant."))}
    return {"format": "limpq-export/v1", "layers": layers, "products": products, "float": floats}
