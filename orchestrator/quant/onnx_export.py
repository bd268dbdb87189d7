"""A quantized model as ONNX in standard QDQ form at its own bit-widths (docs/method.md §11). Layer 1: torch,
onnx and onnxscript, no Ray, no MLflow.

Driven by the quantizers, not by layer classes: every `LsqQuantizer` of the model (a layer's
`weight_quant` and `act_quant`, an attention's operand quantizers, or any other module that quantizes a
tensor through one) is swapped for a stand-in that computes the same thing as one custom op, and the
exporter (torch.onnx, dynamo) translates that op into

    clamp to [Qn * s, Qp * s] -> QuantizeLinear(scale=s, zero_point=0) -> DequantizeLinear

in the smallest integer type that holds [Qn, Qp] (INT4/UINT4 up to 4 bits, INT8/UINT8 up to 8). The
clamp is only there where the bit-width is narrower than its type, so that saturation happens at the
bit-width's own levels. A post-pass then stores every quantized weight already quantized: the float
initializer, its clamp and QuantizeLinear become one integer initializer (INT4 packed two per byte, as
ONNX stores it) read by DequantizeLinear. Everything that PyTorch computes in float (BatchNorm, biases,
layers without quantizers) stays float.

The clamp is written Min -> Max rather than Clip: ONNX Runtime's ClipQuantFusion (at its default
optimization level, up to 1.32 at least) throws on Clip -> QuantizeLinear with a 4-bit zero point, so a
Clip would make the file unloadable in a default ONNX Runtime session. Min/Max compute the same values.

BatchNorm is kept as its own node, not folded into the quantized weights: folding scales each output
channel of the kernel, which moves it off the learned integer grid (the codes would have to be
re-quantized with per-channel scales, a different model from the one that was evaluated).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx import numpy_helper
from onnxscript import opset21 as op
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import replaced_on_success
from orchestrator.quant.lsq import LsqQuantizer, levels
from orchestrator.quant.modules import OperandQuant

MIN_OPSET = 21  # the first opset with INT4/UINT4
MAX_OPSET = 23  # the newest opset this exporter has been checked with (torch.onnx, ONNX Runtime)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_KEY = "limpq.quantizers"  # the model's metadata_props entry listing what is quantized how
MAX_BITS = 8

# ONNX tensor type (and its numpy dtype) of each (signed, 4-bit container) combination
_TYPES = {
    (True, True): (onnx.TensorProto.INT4, ml_dtypes.int4),
    (False, True): (onnx.TensorProto.UINT4, ml_dtypes.uint4),
    (True, False): (onnx.TensorProto.INT8, np.int8),
    (False, False): (onnx.TensorProto.UINT8, np.uint8),
}


@torch.library.custom_op("limpq::quant_dequant", mutates_args=())
def quant_dequant(x: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    """round(clamp(x / s, Qn, Qp)) * s, the forward of an LSQ quantizer at one bit-width."""
    return (x / step).clamp(qn, qp).round() * step


@quant_dequant.register_fake
def _quant_dequant_shape(x: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    return torch.empty_like(x)


def _integer_range(dtype: np.dtype) -> tuple[int, int]:
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def _container(qn: int, qp: int) -> tuple[int, np.dtype]:
    """(ONNX type, numpy dtype) of the smallest integer type holding [qn, qp]."""
    return _TYPES[(qn < 0, qp - qn < 16)]


def _quant_dequant_onnx(x, step: float, qn: int, qp: int):
    """ONNX translation of `quant_dequant` (docs/method.md §11)."""
    onnx_type, dtype = _container(qn, qp)
    scale = op.Constant(value=ir.tensor(np.array(step, dtype=np.float32)))
    zero_point = op.Constant(value=ir.tensor(np.array(0, dtype=dtype), dtype=ir.DataType(onnx_type)))
    if (qn, qp) != _integer_range(dtype):
        x = op.Clip(x, op.Constant(value=ir.tensor(np.array(qn * step, dtype=np.float32))),
                    op.Constant(value=ir.tensor(np.array(qp * step, dtype=np.float32))))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


class _QuantDequant(nn.Module):
    """Export-time stand-in for an LsqQuantizer at its active bit-width."""

    def __init__(self, step: float, qn: int, qp: int) -> None:
        super().__init__()
        self.step, self.qn, self.qp = step, qn, qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.limpq.quant_dequant(x, self.step, self.qn, self.qp)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantizer as exported: the module holding it, weight or activation, bits and ONNX type. An
    attention's operand quantizer (the products q @ k^T and attn @ v at its tied layer's activation bits,
    docs/method.md §7) names the attention module as `layer` and its operand: q, k, probs or v."""

    layer: str
    kind: str  # "weight" or "act"
    bits: int
    signed: bool
    onnx_type: str  # INT4, UINT4, INT8 or UINT8
    scale: float
    operand: str | None = None


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    quantized: tuple[QuantizedTensor, ...]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _layer_of(quantizer_name: str) -> str:
    return quantizer_name.rpartition(".")[0] or "<model>"


def _stand_ins(model: nn.Module) -> dict[str, tuple[_QuantDequant, QuantizedTensor]]:
    """An export stand-in for every LsqQuantizer of `model`; UserError (one line, naming the layer)
    for one that ONNX QDQ cannot express."""
    stand_ins = {}
    operand_quants = {name for name, module in model.named_modules() if isinstance(module, OperandQuant)}
    for name, module in model.named_modules():
        if not isinstance(module, LsqQuantizer):
            continue
        layer, bits, operand = _layer_of(name), module.active_bits, None
        if layer in operand_quants:  # <attention>.operand_quant.<operand>
            layer, operand = _layer_of(layer), name.rpartition(".")[2]
        of_operand = "" if operand is None else f" ({operand} of its attention products)"
        if bits is None:
            raise UserError(f"layer {layer}: its {module.kind} quantizer{of_operand} has no active bit-width (a "
                            f"joint indicator-training model holds step sizes for bits {list(module.bits)}); export a "
                            "model quantized at one policy, e.g. a sweep trial's")
        if bits > MAX_BITS:
            raise UserError(f"layer {layer}: {bits}-bit {module.kind}s{of_operand} do not fit an 8-bit integer type, "
                            "the widest that ONNX QuantizeLinear/DequantizeLinear runtimes execute")
        qn, qp = levels(bits, module.signed)
        step = module.effective_step_size(bits)
        stand_ins[name] = (_QuantDequant(step, qn, qp), QuantizedTensor(
            layer=layer, kind=module.kind, bits=bits, signed=module.signed,
            onnx_type=onnx.TensorProto.DataType.Name(_container(qn, qp)[0]), scale=step, operand=operand))
    return stand_ins


def _replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


def float_copy(model: nn.Module) -> nn.Module:
    """`model` with every quantizer removed: the FP32 model with the same weights (for size and speed
    comparisons with the quantized export)."""
    plain = copy.deepcopy(model).cpu().eval()
    _replace_modules(plain, {name: nn.Identity() for name, module in plain.named_modules()
                             if isinstance(module, LsqQuantizer)})
    return plain


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: limpq writes ONNX opset {MIN_OPSET} (the first with INT4) to {MAX_OPSET}")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = MIN_OPSET,
                batch: int | None = None) -> OnnxExport:
    """Write `model` (a model at one policy, or a float model) as ONNX QDQ to `path`.

    `example` is one input batch (N, C, H, W); `batch` None gives a dynamic batch dimension, an int a
    fixed one. `model` is put in eval mode on the CPU and first runs once on `example`, as
    `mlflow.pytorch.log_model` runs it to infer a signature: LSQ quantizers set their step sizes and
    signs lazily on their first batch, and that settled state, which `model` keeps, is what is
    exported. Pass the example the PyTorch model was logged with.
    """
    check_opset(opset)
    model.cpu().eval()
    with torch.no_grad():
        model(example)
    model = copy.deepcopy(model)
    stand_ins = _stand_ins(model)
    _replace_modules(model, {name: module for name, (module, _) in stand_ins.items()})
    # torch.export specializes a dimension of size 1, so a dynamic batch is traced at batch 2
    traced = example[:1].expand(batch or 2, *example.shape[1:]).contiguous()
    try:
        program = torch.onnx.export(
            model, (traced,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=None if batch else ({0: "batch"},), optimize=False,
            custom_translation_table={torch.ops.limpq.quant_dequant.default: _quant_dequant_onnx}, verbose=False)
    except torch.onnx.errors.OnnxExporterError as error:
        raise UserError(f"the model cannot be exported to ONNX: {_export_failure(error)}") from error
    proto = program.model_proto
    # weights first, while each one still reads its own Clip: the optimizer may fold a small weight's
    # Clip into a new initializer
    _store_weights_as_integers(proto)
    proto = onnxscript.optimizer.optimize(proto)
    _clamp_4bit_inputs_with_min_max(proto)
    _drop_stack_traces(proto)
    quantized = tuple(quantizer for _, quantizer in stand_ins.values())
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps([asdict(q) for q in quantized]))
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with replaced_on_success(path) as staging:  # a reader never sees half a file; its directory is made
        onnx.save_model(proto, staging)
    return OnnxExport(path, quantized)


def _export_failure(error: BaseException) -> str:
    """One line from torch.onnx's chain of errors: the operator it could not translate, and why."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    operator = next((found.group(1) for found in (re.search(r"target=([\w.]+)", str(e)) for e in chain) if found), None)
    root = chain[-1]
    reason = f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else ''}"
    return f"{operator}: {reason}" if operator else reason[:300]


def _value(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """The value of a constant: an initializer or a Constant node's tensor."""
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    node = next(node for node in graph.node if node.op_type == "Constant" and node.output[0] == name)
    return numpy_helper.to_array(next(attribute.t for attribute in node.attribute if attribute.name == "value"))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _clip_range(graph: onnx.GraphProto, clip: onnx.NodeProto, step: np.float32, dtype: np.dtype) -> tuple[int, int]:
    """[Qn, Qp] of a clamp to [Qn * s, Qp * s] before QuantizeLinear into `dtype`."""
    qn, qp = _integer_range(dtype)
    bounds = list(clip.input[1:]) + ["", ""] if clip is not None else ["", ""]  # Clip's bounds are optional
    if bounds[0]:
        qn = max(qn, round(float(_value(graph, bounds[0])) / step))
    if bounds[1]:
        qp = min(qp, round(float(_value(graph, bounds[1])) / step))
    return qn, qp


def _store_weights_as_integers(proto: onnx.ModelProto) -> None:
    """Fold every QuantizeLinear whose input is a float initializer (through its Clip) into an integer
    initializer of the zero point's type, read directly by DequantizeLinear. The codes are computed as
    the PyTorch quantizer computes them (round(clamp(w / s, Qn, Qp)) in float32, ties to even), so the
    dequantized weights are the PyTorch model's, bit for bit."""
    graph = proto.graph
    producer = {output: node for node in graph.node for output in node.output}
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    consumers = _consumers(graph)
    removed_nodes, removed_initializers, added = [], set(), []
    for quantize in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        clip = producer.get(quantize.input[0])
        clip = clip if clip is not None and clip.op_type == "Clip" else None
        source = clip.input[0] if clip is not None else quantize.input[0]
        if source not in initializers or initializers[source].data_type != onnx.TensorProto.FLOAT:
            continue  # an activation
        step = np.float32(_value(graph, quantize.input[1]))
        dtype = _value(graph, quantize.input[2]).dtype
        qn, qp = _clip_range(graph, clip, step, dtype)
        codes = np.clip(numpy_helper.to_array(initializers[source]) / step, qn, qp).round().astype(dtype)
        integer_name = f"{source}_quantized"
        added.append(numpy_helper.from_array(codes, integer_name))
        for dequantize in consumers[quantize.output[0]]:
            dequantize.input[0] = integer_name
        removed_nodes += [quantize, clip] if clip is not None else [quantize]
        if len(consumers[source]) == 1:
            removed_initializers.add(source)
    for node in removed_nodes:
        graph.node.remove(node)
    kept = [initializer for initializer in graph.initializer if initializer.name not in removed_initializers]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)


def _clamp_4bit_inputs_with_min_max(proto: onnx.ModelProto) -> None:
    """Rewrite Clip -> QuantizeLinear(INT4/UINT4) as Min -> Max -> QuantizeLinear (see the module
    docstring: ONNX Runtime's ClipQuantFusion cannot read 4-bit zero points)."""
    graph = proto.graph
    consumers = _consumers(graph)
    nodes = []
    for node in graph.node:
        users = consumers.get(node.output[0], []) if node.op_type == "Clip" else []
        quantize = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
        dtype = _value(graph, quantize.input[2]).dtype if quantize is not None else None
        if dtype is None or dtype not in (ml_dtypes.int4, ml_dtypes.uint4):
            nodes.append(node)
            continue
        low, high = node.input[1], node.input[2]
        qn, qp = _clip_range(graph, node, np.float32(_value(graph, quantize.input[1])), dtype)
        # one tensor may feed several quantizers: the new names come from the Clip's (unique) output
        value, clipped = node.input[0], node.output[0]
        if qp < _integer_range(dtype)[1]:
            nodes.append(onnx.helper.make_node("Min", [value, high], [f"{clipped}_min"], name=f"{node.name}_min"))
            value = f"{clipped}_min"
        if qn > _integer_range(dtype)[0]:
            nodes.append(onnx.helper.make_node("Max", [value, low], [f"{clipped}_max"], name=f"{node.name}_max"))
            value = f"{clipped}_max"
        quantize.input[0] = value
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [initializer for initializer in graph.initializer if initializer.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _drop_stack_traces(proto: onnx.ModelProto) -> None:
    """The exporter records each node's Python stack trace (local file paths) as metadata: not for a
    shipped model."""
    for node in proto.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def quantized_from_metadata(proto: onnx.ModelProto) -> list[QuantizedTensor]:
    """The quantizers an exported model records (its `limpq.quantizers` metadata)."""
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return [QuantizedTensor(**entry) for entry in json.loads(prop.value)]
    return []
