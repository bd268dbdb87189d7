"""Export of a fine-tuned quantized model: integer weight codes and step sizes per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.quant.lsq import levels
from orchestrator.quant.modules import QConv2d, QLinear
from orchestrator.quant.surgery import layout_of, unwrap


@torch.no_grad()
def export_quantized(model: nn.Module) -> dict[str, Any]:
    """{"layers": {name: {...}}, "float": {...}} where each quantized layer holds `weight_codes`
    (int8 for bits <= 8), `weight_step`, `wbits`, and its input quantizer's `abits`, `act_step`,
    `act_signed` (None for a full-precision input). Dequantized weight = codes * step. Everything
    else (BatchNorm, biases) is kept in float under "float"."""
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
    quantized = {f"{name}.weight" for name in layers}
    floats = {key: value for key, value in inner.state_dict().items()
              if key not in quantized and ".weight_quant." not in key and ".act_quant." not in key}
    return {"format": "limpq-export/v1", "layers": layers, "float": floats}
