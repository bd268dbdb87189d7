"""Quantized Conv2d / Linear, switchable BatchNorm, and the operand quantizers of attention products."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.quant.lsq import LsqQuantizer, pick


class _QuantLayer:
    """Shared by QConv2d and QLinear: a weight quantizer, an optional input quantizer, bit control."""

    weight_quant: LsqQuantizer
    act_quant: LsqQuantizer | None

    @classmethod
    def from_float(cls, layer: nn.Module, wbits: Sequence[int], abits: Sequence[int] | None):
        """Wrap `layer`, sharing its weight and bias; `abits=None` keeps a full-precision input (first conv)."""
        with torch.device("meta"):  # the wrapper's own parameters are replaced at once: don't allocate them
            quantized = cls._empty_like(layer)  # defined by each subclass for its own shape
        quantized.weight, quantized.bias = layer.weight, layer.bias
        device = layer.weight.device
        quantized.weight_quant = LsqQuantizer(wbits, "weight").to(device)
        quantized.act_quant = LsqQuantizer(abits, "act").to(device) if abits else None
        return quantized

    def set_bits(self, wbits: int, abits: int | None) -> None:
        self.weight_quant.active_bits = wbits
        if self.act_quant is not None:
            self.act_quant.active_bits = abits

    def _quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return x, self.weight_quant(self.weight)


class QConv2d(_QuantLayer, nn.Conv2d):
    @classmethod
    def _empty_like(cls, conv: nn.Conv2d) -> QConv2d:
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantized_operands(x)
        return self._conv_forward(x, weight, self.bias)


class QLinear(_QuantLayer, nn.Linear):
    @classmethod
    def _empty_like(cls, linear: nn.Linear) -> QLinear:
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantized_operands(x)
        return F.linear(x, weight, self.bias)


class SwitchableBatchNorm2d(nn.Module):
    """One independent BatchNorm2d (affine parameters and running statistics) per bit-width."""

    def __init__(self, bn: nn.BatchNorm2d, bits: Sequence[int]) -> None:
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.copies = nn.ModuleDict({str(b): copy.deepcopy(bn) for b in self.bits})
        # the compiled forward picks the copy by this tensor (not persistent: the state_dict keeps its layout)
        self.register_buffer("active_index", torch.zeros((), dtype=torch.long), persistent=False)
        self._active_bits = self.bits[0]

    @property
    def active_bits(self) -> int:
        return self._active_bits

    @active_bits.setter
    def active_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not a candidate of this BatchNorm {list(self.bits)}")
        if bits != self._active_bits:
            self.active_index.fill_(self.bits.index(bits))
        self._active_bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._indexable():
            return self._indexed_forward(x)
        return self.copies[str(self._active_bits)](x)

    def _indexable(self) -> bool:
        first = self.copies[str(self.bits[0])]
        return first.affine and first.track_running_stats and first.momentum is not None

    def _indexed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm with the active copy chosen by tensor indexing, so that one compiled graph serves
        every policy: the copy's affine parameters are picked from a stack, its running statistics are
        updated as BatchNorm2d does (F.batch_norm on the picked values), then written back to that copy
        only. A copy not picked gets a zero gradient rather than none (see LsqQuantizer)."""
        copies = [self.copies[str(b)] for b in self.bits]  # in the order of active_index
        first, index = copies[0], self.active_index
        weight = pick(torch.stack([bn.weight for bn in copies]), index)
        bias = pick(torch.stack([bn.bias for bn in copies]), index)
        running_mean = pick(torch.stack([bn.running_mean for bn in copies]), index)  # a copy: updated below
        running_var = pick(torch.stack([bn.running_var for bn in copies]), index)
        out = F.batch_norm(x, running_mean, running_var, weight, bias, self.training, first.momentum, first.eps)
        if self.training:
            for position, bn in enumerate(copies):
                picked = index == position
                bn.running_mean.copy_(torch.where(picked, running_mean, bn.running_mean))
                bn.running_var.copy_(torch.where(picked, running_var, bn.running_var))
                bn.num_batches_tracked.add_(picked.long())
        return out

    def extra_repr(self) -> str:
        return f"bits={list(self.bits)}, active={self.active_bits}"


class OperandQuant(nn.Module):
    """Input quantizers of the products between two activations inside an attention module (docs/method.md §7:
    q @ k^T and attn @ v take both operands at one layer's activation bits): `q`, `k`, `probs`
    (the attention weights) and `v`, each an LSQ activation quantizer with a step size per candidate
    bit-width. The surgery attaches one to each explicit attention module as `operand_quant` and ties
    its bits to a layer's activation bits (QuantLayout.operand_quant_of)."""

    OPERANDS = ("q", "k", "probs", "v")

    def __init__(self, bits: Sequence[int]) -> None:
        super().__init__()
        for operand in self.OPERANDS:
            self.add_module(operand, LsqQuantizer(bits, "act"))

    def quantizers(self) -> list[LsqQuantizer]:
        return [getattr(self, operand) for operand in self.OPERANDS]

    def set_bits(self, bits: int | None) -> None:
        for quantizer in self.quantizers():
            quantizer.active_bits = bits
