"""The PyTorch model that computes what its fast ONNX form computes (docs/method.md §12). Layer 1: torch and
onnx, no Ray, no MLflow.

The fast form (`export_onnx(form="fast")`) departs from the PyTorch model it is exported from in two ways,
both needed for ONNX Runtime's QLinearConv/QGemm: a quantized layer's float bias (with its folded
BatchNorm) becomes INT32 codes on the accumulator's grid, and a convolution whose output reaches no
quantizer (a ResNet block's last one, before the residual Add) gets an 8-bit output quantizer.
`deploy` writes the fast file and applies both to a copy of the model: each bias parameter moved onto its
grid, and each added quantizer put in as a real one (`QuantizedOutput`). That copy is what a sweep
registers: the model the registered ONNX file computes up to float rounding (its own fast export adds
nothing), and whose val top-1 is measured as it is deployed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.quant.lsq import LsqQuantizer
from orchestrator.quant.modules import SwitchableBatchNorm2d
from orchestrator.quant.onnx_export import OnnxExport, export_onnx

OUTPUT_BITS = 8  # the fast form's added quantizers: signed 8-bit (UINT8 at zero point 128 in the file)


class QuantizedOutput(nn.Module):
    """`module` followed by a fixed signed 8-bit quantizer of its output (kind "output", its step set)."""

    def __init__(self, module: nn.Module, step: float) -> None:
        super().__init__()
        self.module = module
        self.output_quant = LsqQuantizer((OUTPUT_BITS,), "output")
        with torch.no_grad():
            self.output_quant.step[str(OUTPUT_BITS)].fill_(step)
        self.output_quant.requires_grad_(False)
        self.output_quant.initialized.fill_(True)
        self.output_quant.signed_state.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.module(x))


@dataclass(frozen=True)
class Deployment:
    """A trained model as deployed: `model`, the copy changed to compute what its fast ONNX form
    computes, and `export`, that form (exported from the trained model; re-exporting `model` would
    write the same file, adding nothing)."""

    model: nn.Module
    export: OnnxExport


@torch.no_grad()
def deploy(model: nn.Module, example: torch.Tensor, path: str | Path) -> Deployment:
    """`model` (at one policy) exported in the fast form to `path`, and a copy of it (in eval mode on the
    CPU) changed to compute what that file computes. `example` is one input batch, as for `export_onnx`.
    A change naming a parameter or module the model does not have (a graph whose initializers the
    exporter did not name after the model's parameters) is left out: the export's agreement check then
    shows what that costs. UserError for a model ONNX QDQ cannot express."""
    export = export_onnx(model, example, path, form="fast")
    deployed = copy.deepcopy(model).cpu().eval()
    modules = dict(deployed.named_modules())
    for change in export.changes:
        bias = _bias(modules.get(change.bias_of))
        if bias is not None:
            bias.copy_((bias.double() + torch.from_numpy(change.bias_shift)).to(bias.dtype))
        if change.output_of is not None and change.output_of in modules:
            parent, _, child = change.output_of.rpartition(".")
            target = deployed.get_submodule(parent) if parent else deployed
            setattr(target, child, QuantizedOutput(modules[change.output_of], change.output_step))
    return Deployment(deployed, export)


def _bias(module: nn.Module | None) -> torch.Tensor | None:
    """The bias parameter a module adds: a BatchNorm's beta (a joint model's switchable one: its active
    copy's), a layer's own bias."""
    if isinstance(module, SwitchableBatchNorm2d):
        module = module.copies[str(module.active_bits)]
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nn.Parameter) else None
