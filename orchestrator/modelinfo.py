"""Build torchvision classifiers by name and trace their Conv2d/Linear layers in forward order.

Both the quantization surgery and the search cost model read the same trace, so the searchable
layer list (names, order, fixed layers) is defined once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision import models

from orchestrator.errors import UserError


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d or Linear as seen in a forward pass at a given input size."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    weight_numel: int
    macs: int  # exact: Cin * Cout * kh * kw / groups * Hout * Wout (Linear: in * out)
    bn_name: str | None  # the BatchNorm that directly consumes this layer's output, if any

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(arch: str, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """A torchvision classification model by name; `weights` (a torchvision weights name) downloads."""
    try:
        builder = models.get_model_builder(arch)
    except ValueError:
        known = ", ".join(sorted(models.list_models(module=models)))
        raise UserError(f"model.arch: unknown torchvision model {arch!r}; known: {known}") from None
    if weights:
        try:
            weight_enum = models.get_weight(weights)
        except (ValueError, AttributeError, KeyError):
            raise UserError(f"fp.weights: unknown torchvision weights name {weights!r}") from None
        model = builder(weights=weight_enum)
        if num_classes != len(weight_enum.meta["categories"]):
            replace_classifier(model, num_classes)
        return model
    return builder(weights=None, num_classes=num_classes)


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for a fresh one with `num_classes` outputs (fine-tuning on a new label set)."""
    name, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: int) -> list[LayerInfo]:
    """Run one eval-mode forward at `input_size` and list every Conv2d/Linear in execution order.

    A module called more than once is listed at its first call. Names are the module names without a
    DDP `module.` prefix.
    """
    records: dict[str, dict] = {}
    order: list[str] = []
    producer_of: dict[int, str] = {}
    bn_of: dict[str, str] = {}
    handles = []

    def layer_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            producer_of[id(output)] = name
            if name in records:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                in_hw, out_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
                kh, kw = _pair(module.kernel_size)
                macs = module.in_channels * module.out_channels * kh * kw // module.groups * out_hw[0] * out_hw[1]
                records[name] = dict(
                    kind="conv", in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=(kh, kw), stride=_pair(module.stride), padding=_pair(module.padding),
                    dilation=_pair(module.dilation), groups=module.groups, input_hw=in_hw, output_hw=out_hw,
                    weight_numel=module.weight.numel(), macs=macs,
                )
            else:
                records[name] = dict(
                    kind="linear", in_channels=module.in_features, out_channels=module.out_features,
                    kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                    input_hw=(1, 1), output_hw=(1, 1), weight_numel=module.weight.numel(),
                    macs=module.in_features * module.out_features,
                )
            order.append(name)

        return hook

    def bn_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            source = producer_of.get(id(inputs[0]))
            if source is not None and source not in bn_of:
                bn_of[source] = name

        return hook

    for name, module in model.named_modules():
        clean = name.removeprefix("module.")
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(layer_hook(clean)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_hook(clean)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [LayerInfo(name=name, bn_name=bn_of.get(name), **records[name]) for name in order]


def default_fixed_layers(layers: list[LayerInfo]) -> list[str]:
    """SPEC 1.2: the first convolution and the final classifier are not searched."""
    fixed = []
    convs = [layer.name for layer in layers if layer.kind == "conv"]
    linears = [layer.name for layer in layers if layer.kind == "linear"]
    if convs:
        fixed.append(convs[0])
    if linears:
        fixed.append(linears[-1])
    return fixed


def split_layers(layers: list[LayerInfo], fixed_names: list[str] | None = None) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """(searchable, fixed) in forward order; unknown fixed names are an error listing the known ones."""
    names = {layer.name for layer in layers}
    fixed_names = default_fixed_layers(layers) if fixed_names is None else fixed_names
    unknown = [name for name in fixed_names if name not in names]
    if unknown:
        raise UserError(f"model.fixed_layers: not layers of the model: {', '.join(unknown)}")
    fixed = set(fixed_names)
    return [la for la in layers if la.name not in fixed], [la for la in layers if la.name in fixed]
