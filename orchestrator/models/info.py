"""Build models (torchvision classifiers by name, or a user's `module:callable`) and trace what one
forward pass multiplies: the Conv2d/Linear layers in forward order, and every other multiply-accumulate.

Both the quantization surgery and the search cost model read the same trace, so the searchable
layer list (names, order, fixed layers) is defined once. MACs follow docs/method.md §6 ("MACs in general"):
what one forward pass at batch 1 multiplies, from the shapes each layer sees.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper
from torchvision import models

from orchestrator.config.schema import ModelConfig
from orchestrator.common.errors import UserError
from orchestrator.models.explicit_layers import attention_ties, make_weights_explicit
from orchestrator.models.user_module import build_user_model, is_import_path

# Defaults for torchvision builders whose train-mode forward is not one logits tensor: their auxiliary
# classifiers are a training aid of their own recipe, not something the LIMPQ stages can train.
TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


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
    # exact, summed over the module's calls: Cin * Cout * kh * kw / groups * Hout * Wout for a conv,
    # tokens * in * out for a Linear
    macs: int
    bn_name: str | None  # the BatchNorm that directly consumes this layer's output, if any
    tokens: int = 1  # a Linear's input positions at batch 1 in its first call (1 on a pooled vector)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FloatOp:
    """Multiply-accumulates outside any Conv2d/Linear module call, summed per (name, kind). `kind`
    "weight": a weight multiplied without its layer module (named by the weight); "attention":
    scaled_dot_product_attention (q @ k^T and attn @ v); "matmul": other products of two activations
    (both named by the module that computed them). They run in float, except the products of an
    explicit attention module (orchestrator.models.explicit_layers), which the quantized model computes with
    both operands at the activation bits of the layer `quantized_with` names."""

    name: str
    kind: str
    macs: int
    params: int  # the weight's elements for kind "weight", else 0
    quantized_with: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelTrace:
    layers: tuple[LayerInfo, ...]
    float_ops: tuple[FloatOp, ...]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers) + sum(op.macs for op in self.float_ops)


def build_model(arch: str, num_classes: int = 1000, weights: str | None = None,
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A torchvision classification model by name (`weights`: a torchvision weights name, downloads) or
    a user's `module:callable`, called with `num_classes=` and `kwargs`; then every weight the model
    reads functionally is made a layer module (orchestrator.models.explicit_layers)."""
    kwargs = dict(kwargs or {})
    # arguments limpq passes itself: a second value would fail the call, far from its cause
    reserved = {"num_classes": "model.num_classes (--num-classes)"}
    if not is_import_path(arch):
        reserved["weights"] = "fp.weights"
    for key, setting in reserved.items():
        if key in kwargs:
            raise UserError(f"model.kwargs: {key!r} is set by {setting}; remove it from model.kwargs "
                            "(--model-kwargs)")
    if is_import_path(arch):
        if weights:
            raise UserError(f"fp.weights: torchvision weights need a torchvision model.arch, not {arch}; "
                            "load your weights with fp.source: checkpoint")
        return make_weights_explicit(build_user_model(arch, num_classes, kwargs))
    try:
        builder = models.get_model_builder(arch)
    except ValueError:
        known = ", ".join(sorted(models.list_models(module=models)))
        raise UserError(f"model.arch: unknown torchvision model {arch!r}; known: {known}") from None
    kwargs = {**TORCHVISION_DEFAULTS.get(arch, {}), **kwargs}
    if weights:
        try:
            weight_enum = models.get_weight(weights)
        except (ValueError, AttributeError, KeyError):
            raise UserError(f"fp.weights: unknown torchvision weights name {weights!r}") from None
        model = _call_builder(builder, arch, weights=weight_enum, **kwargs)
        if num_classes != len(weight_enum.meta["categories"]):
            replace_classifier(model, num_classes)
        return make_weights_explicit(model)
    return make_weights_explicit(_call_builder(builder, arch, weights=None, num_classes=num_classes, **kwargs))


def _call_builder(builder, arch: str, **arguments) -> nn.Module:
    try:
        return builder(**arguments)
    except (TypeError, ValueError) as error:  # e.g. a model.kwargs key the builder does not take
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"model.kwargs: torchvision's {arch} refuses them ({reason})") from None


def build_configured_model(model: ModelConfig, weights: str | None = None) -> nn.Module:
    """`build_model` of a config's `model` section (arch, num_classes, kwargs)."""
    return build_model(model.arch, model.num_classes, weights, model.kwargs)


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for a fresh one with `num_classes` outputs (fine-tuning on a new label set)."""
    name, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's flop formulas (torch.utils.flop_counter), plus its attention formula for the CPU attention
# kernel, for which torch registers none (FlopCounterMode counts 0 for attention on CPU)
_ATTENTION_OPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                  torch.ops.aten._scaled_dot_product_efficient_attention,
                  torch.ops.aten._scaled_dot_product_flash_attention,
                  torch.ops.aten._scaled_dot_product_cudnn_attention}
_FORMULAS = {**flop_registry,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_sdpa_flops)}
# the operands that are multiplied (addmm/baddbmm add their first argument)
_ADDS_FIRST = {torch.ops.aten.addmm, torch.ops.aten.baddbmm}


class _MultiplyRecorder(TorchDispatchMode):
    """Counts, as torch.utils.flop_counter does (same formulas, same decomposition of the ops it has no
    formula for), the MACs of every op outside a Conv2d/Linear module call, attributed to the weight it
    multiplies or to the innermost module running."""

    def __init__(self, weight_of_storage: dict[int, tuple[str, int]], ties: dict[str, str]) -> None:
        super().__init__()
        self.weight_of_storage = weight_of_storage
        self.ties = ties
        self.module_stack: list[str] = []
        self.inside_layer = 0
        self.ops: dict[tuple[str, str], list] = {}  # (name, kind) -> [macs, params, quantized_with]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in _FORMULAS and func is not torch.ops.prim.device.default:
            with self:
                result = func.decompose(*args, **kwargs)
                if result is not NotImplemented:
                    return result
        out = func(*args, **kwargs)
        if packet in _FORMULAS and not self.inside_layer:
            self._record(packet, out, args, kwargs)
        return out

    def _record(self, packet, out, args, kwargs) -> None:
        macs = int(_FORMULAS[packet](*args, **kwargs, out_val=out)) // 2
        operands = [a for a in tree_flatten(args[1:] if packet in _ADDS_FIRST else args)[0]
                    if isinstance(a, torch.Tensor)]
        weight = next((self.weight_of_storage[key] for key in (_storage_key(t) for t in operands)
                       if key in self.weight_of_storage), None)
        if weight is not None:
            key, params, tie = (weight[0], "weight"), weight[1], None
        else:
            module = self.module_stack[-1] if self.module_stack else ""
            key, params = (module, "attention" if packet in _ATTENTION_OPS else "matmul"), 0
            tie = self.ties.get(module)
        entry = self.ops.setdefault(key, [0, params, tie])
        entry[0] += macs


def _storage_key(tensor: torch.Tensor) -> int:
    """The address of the memory a tensor views (a weight and its views share it); 0 for a tensor with
    no memory of its own: a sparse tensor raises NotImplementedError, a tensor subclass without
    storage RuntimeError, and a meta tensor reports 0. None of them is a dense weight."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _layer_call(module: nn.Conv2d | nn.Linear, x: torch.Tensor, output: torch.Tensor) -> dict[str, Any]:
    """The LayerInfo fields (but name and BatchNorm) of one Conv2d/Linear call on input `x`."""
    if isinstance(module, nn.Conv2d):
        out_hw = tuple(output.shape[-2:])
        kh, kw = _pair(module.kernel_size)
        macs = module.in_channels * module.out_channels * kh * kw // module.groups * out_hw[0] * out_hw[1]
        return dict(kind="conv", in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=(kh, kw), stride=_pair(module.stride), padding=_pair(module.padding),
                    dilation=_pair(module.dilation), groups=module.groups, input_hw=tuple(x.shape[-2:]),
                    output_hw=out_hw, weight_numel=module.weight.numel(), macs=macs, tokens=1)
    tokens = x.numel() // module.in_features
    return dict(kind="linear", in_channels=module.in_features, out_channels=module.out_features,
                kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                input_hw=(1, 1), output_hw=(1, 1), weight_numel=module.weight.numel(),
                macs=tokens * module.in_features * module.out_features, tokens=tokens)


class _LayerTracer:
    """The forward hooks of `trace_model`: every Conv2d/Linear call (in order of first call, MACs
    summed over calls), the BatchNorm that reads a layer's output directly, and the module stack and
    layer nesting the multiply recorder attributes its ops by. Hook names are module names without a
    DDP `module.` prefix."""

    def __init__(self, recorder: _MultiplyRecorder) -> None:
        self.recorder = recorder
        self.records: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        # id(output) -> (output, layer): holding the output keeps its id from being reused by a later tensor
        self.producer_of: dict[int, tuple[torch.Tensor, str]] = {}
        self.bn_of: dict[str, str] = {}

    def enter_module(self, name: str, module: nn.Module, inputs: tuple) -> None:
        self.recorder.module_stack.append(name)

    def leave_module(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.recorder.module_stack.pop()

    def enter_layer(self, module: nn.Module, inputs: tuple) -> None:
        self.recorder.inside_layer += 1

    def leave_layer(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.recorder.inside_layer -= 1
        self.producer_of[id(output)] = (output, name)
        call = _layer_call(module, inputs[0], output)
        if name in self.records:
            self.records[name]["macs"] += call["macs"]
        else:
            self.records[name] = call
            self.order.append(name)

    def enter_batchnorm(self, name: str, module: nn.Module, inputs: tuple) -> None:
        output, source = self.producer_of.get(id(inputs[0]), (None, None))
        if output is inputs[0] and source not in self.bn_of:
            self.bn_of[source] = name

    def attach(self, model: nn.Module) -> list:
        """Register the hooks on every module of `model`; returns their handles."""
        handles = []
        for name, module in model.named_modules():
            clean = name.removeprefix("module.")
            handles.append(module.register_forward_pre_hook(partial(self.enter_module, clean)))
            handles.append(module.register_forward_hook(self.leave_module, always_call=True))
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_pre_hook(self.enter_layer))
                handles.append(module.register_forward_hook(partial(self.leave_layer, clean)))
            elif isinstance(module, nn.BatchNorm2d):
                handles.append(module.register_forward_pre_hook(partial(self.enter_batchnorm, clean)))
        return handles

    def layers(self) -> tuple[LayerInfo, ...]:
        return tuple(LayerInfo(name=name, bn_name=self.bn_of.get(name), **self.records[name]) for name in self.order)


def _weights_by_storage(model: nn.Module) -> dict[int, tuple[str, int]]:
    """storage address -> (parameter name, element count) of every non-empty parameter."""
    weights = {_storage_key(param): (name.removeprefix("module."), param.numel())
               for name, param in model.named_parameters() if param.numel() > 0}
    weights.pop(0, None)
    return weights


@torch.no_grad()
def trace_model(model: nn.Module, input_size: int, num_classes: int | None = None) -> ModelTrace:
    """Run one eval-mode forward at batch 1 and `input_size` and record every Conv2d/Linear module call
    in execution order (a module called more than once is listed at its first call, its MACs summed
    over the calls) and every other multiply (FloatOp). Names are module names without a DDP
    `module.` prefix. torch's fused attention fast paths are off during the trace, so the ops it
    records are those of the training forward.

    What the pipeline cannot train is a UserError naming model.arch: a forward that takes more than
    one input, an output that is not one (1, C) logits tensor (C = `num_classes` when given), a model
    with no Conv2d/Linear layer to quantize."""
    _check_single_input(model)
    ties = {name.removeprefix("module."): layer.removeprefix("module.") for name, layer in attention_ties(model).items()}
    recorder = _MultiplyRecorder(_weights_by_storage(model), ties)
    tracer = _LayerTracer(recorder)
    handles = tracer.attach(model)
    try:
        output = _forward_at_batch_one(model, input_size, recorder)
    finally:
        for handle in handles:
            handle.remove()
    if not tracer.order:
        raise UserError(f"model.arch: {type(model).__name__} runs no Conv2d or Linear module, so nothing of it "
                        "can be quantized; build its layers from torch.nn.Conv2d and torch.nn.Linear")
    _check_logits(model, output, num_classes)
    float_ops = tuple(FloatOp(name, kind, macs, params, tie) for (name, kind), (macs, params, tie)
                      in recorder.ops.items() if macs > 0)
    return ModelTrace(tracer.layers(), float_ops)


def _check_single_input(model: nn.Module) -> None:
    """The pipeline feeds a model one image batch: a forward that needs more is refused before it runs
    (it would fail on the missing argument, which reads as a wrong input size)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature Python can read: left to the trace
        return
    required = [p.name for p in parameters if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) > 1:
        raise UserError(f"model.arch: {type(model).__name__}.forward takes {len(required)} inputs "
                        f"({', '.join(required)}), but the pipeline passes one image batch; give the model a "
                        "forward(x) (e.g. a wrapper module that supplies the others)")


def _check_logits(model: nn.Module, output: Any, num_classes: int | None) -> None:
    """The forward of a batch of one returned one (1, C) logits tensor, C = `num_classes` when given."""
    name = type(model).__name__
    if not isinstance(output, torch.Tensor):
        raise UserError(f"model.arch: {name}.forward returns a {type(output).__name__}, not one logits tensor of "
                        "shape (N, model.num_classes); return the logits alone")
    if output.dim() != 2 or output.shape[0] != 1:
        raise UserError(f"model.arch: {name}.forward returns a tensor of shape {tuple(output.shape)} for one image, "
                        "not logits of shape (N, model.num_classes); pool or flatten it to (N, model.num_classes)")
    if num_classes is not None and output.shape[1] != num_classes:
        raise UserError(f"model.num_classes: {num_classes}, but {name}.forward returns {output.shape[1]} logits per "
                        f"image; set model.num_classes: {output.shape[1]}, or make its classifier give "
                        f"num_classes outputs")


def trace_layers(model: nn.Module, input_size: int) -> list[LayerInfo]:
    """The Conv2d/Linear layers of `trace_model`, in forward order."""
    return list(trace_model(model, input_size).layers)


def default_fixed_layers(layers: list[LayerInfo]) -> list[str]:
    """docs/method.md §2.3: the first convolution and the final classifier are not searched."""
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


def _forward_at_batch_one(model: nn.Module, input_size: int, mode: TorchDispatchMode) -> Any:
    """One eval-mode forward of a zero image batch of 1 under `mode`, torch's fused attention fast paths
    off (they bypass the modules), and its output; the model's mode and the fast-path setting are
    restored after."""
    was_training = model.training
    fast_path = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        with mode:
            return model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        model.train(was_training)


@torch.no_grad()
def flop_counter_macs(model: nn.Module, input_size: int) -> int:
    """An independent count of the same forward: torch.utils.flop_counter.FlopCounterMode's FLOPs / 2
    (eval mode, batch 1, attention fast paths off, its attention formula also for the CPU kernel)."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    _forward_at_batch_one(model, input_size, counter)
    return counter.get_total_flops() // 2
