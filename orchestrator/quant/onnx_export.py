"""A quantized model as ONNX QDQ at its own bit-widths (docs/method.md §11-§12), in one of three forms. Layer 1:
torch, onnx and onnxscript, no Ray, no MLflow.

Driven by the quantizers, not by layer classes: every `LsqQuantizer` of the model (a layer's
`weight_quant` and `act_quant`, an attention's operand quantizers, or any other module that quantizes a
tensor through one) is swapped for a stand-in that computes the same thing as one custom op, which the
exporter (torch.onnx, dynamo) translates into QuantizeLinear -> DequantizeLinear. A post-pass stores
every quantized weight already quantized: one integer initializer read by DequantizeLinear, its codes
computed as the PyTorch quantizer computes them.

- compact (this function's default; a trial's `onnx/model-compact.onnx` artifact): the smallest file (INT4/UINT4 up to 4 bits, packed two
  per byte), BatchNorm kept; ONNX Runtime has no 4-bit convolution and runs it in float. A clamp narrower
  than the type is written Min -> Max before QuantizeLinear rather than Clip: ONNX Runtime's
  ClipQuantFusion (up to 1.32 at least) throws on Clip -> QuantizeLinear with a 4-bit zero point.
- integer: what ONNX Runtime's CPU session runs on integer kernels
  (ConvInteger, QGemm, QLinearMatMul, MatMulIntegerToFloat). Weights INT8, activations UINT8 (a signed
  quantizer's codes at zero point 128); a 2- to 6-bit activation is clamped to its own levels by an
  integer Clip after QuantizeLinear (ONNX Runtime's fusions take no float op between a product and a
  QuantizeLinear). BatchNorm is folded into the convolution exactly (same codes, per-channel scales);
  see _integer_convolutions. It computes exactly the evaluated model, but ONNX Runtime's CPU
  ConvInteger is slower than its float convolution (benchmarks/bench_export.py).
- fast (`limpq export`'s default, what the registry holds): DQ -> Conv -> Q units that ONNX Runtime
  fuses into QLinearConv (and QGemm), the fastest on its CPU: the integer form's containers and folded
  BatchNorm, the bias as INT32 codes on the accumulator's grid, and an 8-bit output quantizer added where
  a convolution's output reaches no quantizer (a ResNet block's residual Add); see _fast_convolutions.
  Both change the model slightly; the export returns the changes (`FastFormChange`) and
  `quant.deployed.deploy` makes them in PyTorch, so that a trial registers the model the file
  computes (docs/method.md §12).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
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
# compact: the smallest file (INT4 packed); integer: every quantized convolution as ConvInteger (exact,
# slow on ONNX Runtime's x86 CPU); fast: DQ -> Conv -> Q units ONNX Runtime fuses into QLinearConv
# (BatchNorm folded, INT32 biases, 8-bit outputs added before residual Adds)
FORMS = ("compact", "integer", "fast")
# the range of an export-added 8-bit output quantizer (fast form): BatchNorm's output has mean beta and
# standard deviation |gamma| per channel over the data its statistics came from; this many deviations
# on either side of the mean, the widest channel's
OUTPUT_RANGE_STDS = 6.0
# vpmaddubsw (x86 AVX2/AVX-512 without VNNI) adds two UINT8 x INT8 products in a saturating INT16: a
# shifted weight code is kept within what cannot saturate for its input's largest UINT8 code
_INT16_MAX = 32767

# ONNX tensor type (and its numpy dtype) of each (signed, 4-bit container) combination
_TYPES = {
    (True, True): (onnx.TensorProto.INT4, ml_dtypes.int4),
    (False, True): (onnx.TensorProto.UINT4, ml_dtypes.uint4),
    (True, False): (onnx.TensorProto.INT8, np.int8),
    (False, False): (onnx.TensorProto.UINT8, np.uint8),
}


@torch.library.custom_op("limpq::quant_dequant", mutates_args=())
def quant_dequant(x: torch.Tensor, step: float, qn: int, qp: int, container: str) -> torch.Tensor:
    """round(clamp(x / s, Qn, Qp)) * s, the forward of an LSQ quantizer at one bit-width; `container`
    says how the ONNX translation stores the codes (one of _TRANSLATIONS)."""
    return (x / step).clamp(qn, qp).round() * step


@quant_dequant.register_fake
def _quant_dequant_shape(x: torch.Tensor, step: float, qn: int, qp: int, container: str) -> torch.Tensor:
    return torch.empty_like(x)


def _integer_range(dtype: np.dtype) -> tuple[int, int]:
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def _container(qn: int, qp: int, wide: bool = False) -> tuple[int, np.dtype]:
    """(ONNX type, numpy dtype) of the smallest integer type holding [qn, qp] (`wide`: of 8 bits)."""
    return _TYPES[(qn < 0, qp - qn < 16 and not wide)]


def _uint8_zero_point(qn: int) -> int:
    """The integer form's activations are UINT8 (the type x86 integer kernels take): an unsigned
    quantizer's codes as they are, a signed one's shifted by 128 (zero point 128), which holds every
    signed level up to 8 bits."""
    return 0 if qn >= 0 else 128


def _uint8_quant_dequant(x, step: float, qn: int, qp: int):
    """QuantizeLinear to UINT8 -> Clip to the bit-width's own codes (in the integer domain) ->
    DequantizeLinear: the same values as round(clamp(x / s, Qn, Qp)) * s, since clamping to integer
    bounds commutes with rounding; ConvInteger reads the UINT8 codes directly (_integer_convolutions)."""
    zero = _uint8_zero_point(qn)
    scale = _constant(step, np.float32)
    zero_point = _constant(zero, np.uint8)
    codes = op.QuantizeLinear(x, scale, zero_point)
    if (qn + zero, qp + zero) != (0, 255):
        codes = op.Clip(codes, _constant(qn + zero, np.uint8), _constant(qp + zero, np.uint8))
    return op.DequantizeLinear(codes, scale, zero_point)


def _constant(value, dtype, onnx_type=None):
    array = np.array(value, dtype=dtype)
    return op.Constant(value=ir.tensor(array, dtype=ir.DataType(onnx_type)) if onnx_type else ir.tensor(array))


def _quant_dequant_onnx(x, step: float, qn: int, qp: int, container: str):
    """ONNX translation of `quant_dequant` (docs/method.md §11)."""
    if container == "uint8":
        return _uint8_quant_dequant(x, step, qn, qp)
    onnx_type, dtype = _container(qn, qp, wide=container == "int8")
    scale = op.Constant(value=ir.tensor(np.array(step, dtype=np.float32)))
    zero_point = op.Constant(value=ir.tensor(np.array(0, dtype=dtype), dtype=ir.DataType(onnx_type)))
    if (qn, qp) != _integer_range(dtype):
        x = op.Clip(x, op.Constant(value=ir.tensor(np.array(qn * step, dtype=np.float32))),
                    op.Constant(value=ir.tensor(np.array(qp * step, dtype=np.float32))))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


class _QuantDequant(nn.Module):
    """Export-time stand-in for an LsqQuantizer at its active bit-width."""

    def __init__(self, step: float, qn: int, qp: int, container: str) -> None:
        super().__init__()
        self.step, self.qn, self.qp, self.container = step, qn, qp, container

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.limpq.quant_dequant(x, self.step, self.qn, self.qp, self.container)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantizer as exported: the module holding it, weight or activation, bits and ONNX type. An
    attention's operand quantizer (the products q @ k^T and attn @ v at its tied layer's activation bits,
    docs/method.md §7) names the attention module as `layer` and its operand: q, k, probs or v."""

    layer: str
    kind: str  # "weight", "act", or "output": an 8-bit quantizer the fast form adds (_fast_convolutions)
    bits: int
    signed: bool
    onnx_type: str  # INT4, UINT4, INT8 or UINT8
    scale: float  # a folded weight's per-channel scales are this step times its BatchNorm factors
    operand: str | None = None
    zero_point: int = 0


@dataclass(frozen=True)
class FastFormChange:
    """Where the fast form computes something the PyTorch model does not, at one layer (_fast_convolutions):
    its float bias stored as INT32 codes, `bias_shift` (codes x scale minus the float bias) away from the
    PyTorch model's, to be added to the bias of PyTorch module `bias_of` (a folded BatchNorm, whose beta
    it is, or the layer itself) for the same sum; and, where `output_of` is set, the 8-bit output
    quantizer (signed, step `output_step`) the file adds after that module's output. `quant.deployed`
    applies these to a PyTorch model."""

    bias_of: str
    bias_shift: np.ndarray
    output_of: str | None = None
    output_step: float | None = None


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    quantized: tuple[QuantizedTensor, ...]
    changes: tuple[FastFormChange, ...] = ()  # the fast form's only

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _layer_of(quantizer_name: str) -> str:
    return quantizer_name.rpartition(".")[0] or "<model>"


def _stand_ins(model: nn.Module, form: str) -> dict[str, tuple[_QuantDequant, QuantizedTensor]]:
    """An export stand-in for every LsqQuantizer of `model`; UserError (one line, naming the layer)
    for one that ONNX QDQ cannot express. The compact form stores codes in the smallest type; the
    integer form weights as INT8, activations as UINT8 (see _uint8_quant_dequant)."""
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
        # an activation wider than 4 bits is UINT8 in every form: a signed INT8 one makes ONNX Runtime's
        # QDQ propagation write a QuantizeLinear it then refuses (at an attention's k Transpose)
        if module.kind != "weight" and (form != "compact" or qp - qn >= 16):
            container = "uint8"
        else:
            container = "int8" if form != "compact" else "smallest"
        zero_point = _uint8_zero_point(qn) if container == "uint8" else 0
        onnx_type = onnx.TensorProto.UINT8 if container == "uint8" else _container(qn, qp, wide=container == "int8")[0]
        stand_ins[name] = (_QuantDequant(step, qn, qp, container), QuantizedTensor(
            layer=layer, kind=module.kind, bits=bits, signed=module.signed,
            onnx_type=onnx.TensorProto.DataType.Name(onnx_type), scale=step, operand=operand, zero_point=zero_point))
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


def check_form(form: str) -> None:
    if form not in FORMS:
        raise UserError(f"--form {form}: give one of {', '.join(FORMS)}")


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: limpq writes ONNX opset {MIN_OPSET} (the first with INT4) to {MAX_OPSET}")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = MIN_OPSET,
                batch: int | None = None, form: str = "compact") -> OnnxExport:
    """Write `model` (a model at one policy, or a float model) as ONNX QDQ to `path`, in `form`.

    `example` is one input batch (N, C, H, W); `batch` None gives a dynamic batch dimension, an int a
    fixed one. `model` is put in eval mode on the CPU and first runs once on `example`, as
    `mlflow.pytorch.log_model` runs it to infer a signature: LSQ quantizers set their step sizes and
    signs lazily on their first batch, and that settled state, which `model` keeps, is what is
    exported. Pass the example the PyTorch model was logged with.
    """
    check_opset(opset)
    check_form(form)
    model.cpu().eval()
    with torch.no_grad():
        model(example)
    model = copy.deepcopy(model)
    stand_ins = _stand_ins(model, form)
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
    quantized = tuple(quantizer for _, quantizer in stand_ins.values())
    changes: tuple[FastFormChange, ...] = ()
    if form == "integer":
        _integer_convolutions(proto)
    elif form == "fast":
        added, changes = _fast_convolutions(proto)
        quantized += added
    else:
        _clamp_4bit_inputs_with_min_max(proto)
    _drop_stack_traces(proto)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps([asdict(q) for q in quantized]))
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with replaced_on_success(path) as staging:  # a reader never sees half a file; its directory is made
        onnx.save_model(proto, staging)
    return OnnxExport(path, quantized, changes)


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


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _integer_convolutions(proto: onnx.ModelProto) -> None:
    """The integer form's graph pass over every convolution whose weights are integer codes (DequantizeLinear
    of an initializer at one step s). A BatchNormalization that is the convolution's only reader is
    folded in exactly: the codes stay the PyTorch quantizer's, and with f[c] = gamma[c] / sqrt(var[c] + eps)

        weight[c] = codes[c] * s * f[c]        bias[c] = beta[c] + f[c] * (b[c] - mean[c])

    (f = 1 and the convolution's own bias without BatchNorm). Where the input is quantized (UINT8 codes
    at one scale x_scale), the convolution becomes ConvInteger on the input codes and the INT8 weight
    codes, and its INT32 sums are scaled per output channel by x_scale * s * f[c], plus the bias, in
    float (Cast -> Mul -> Add): an integer kernel that computes the PyTorch model's convolution and
    BatchNorm up to float rounding. (QLinearConv, which ONNX Runtime fuses from DQ -> Conv -> Q, rounds
    the bias to INT32 units of x_scale * s * f[c] and requantizes its output: at 2- to 4-bit steps that
    moved enough activations across a rounding boundary to change predictions.) A convolution with a
    float input (a first layer) reads DequantizeLinear(codes, s * f[c], axis 0) and a float bias."""
    graph = proto.graph
    producer = {output: node for node in graph.node for output in node.output}
    consumers = _consumers(graph)
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    added_initializers: list[onnx.TensorProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # nodes to place right before a node
    replaced: dict[int, list[onnx.NodeProto]] = {}  # nodes that take a node's place
    removed: set[int] = set()
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        weights = producer.get(conv.input[1])
        if (weights is None or weights.op_type != "DequantizeLinear" or weights.input[0] not in initializers
                or len(consumers[weights.output[0]]) != 1 or np.size(_value(graph, weights.input[1])) != 1):
            continue
        codes = numpy_helper.to_array(initializers[weights.input[0]])
        step = np.float32(_value(graph, weights.input[1]))
        channels = codes.shape[0]
        bias = numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float32) \
            if len(conv.input) > 2 and conv.input[2] in initializers else np.zeros(channels, np.float32)
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in initializers:
            continue  # a bias computed in the graph: left as it is
        factor, output = np.ones(channels, np.float32), conv.output[0]
        readers = consumers.get(conv.output[0], [])
        if (len(readers) == 1 and readers[0].op_type == "BatchNormalization"
                and all(name in initializers for name in readers[0].input[1:5])):
            batchnorm = readers[0]
            gamma, beta, mean, var = (numpy_helper.to_array(initializers[name]).astype(np.float32)
                                      for name in batchnorm.input[1:5])
            factor = gamma / np.sqrt(var + np.float32(_attribute(batchnorm, "epsilon", 1e-5)))
            bias = beta + factor * (bias - mean)
            output = batchnorm.output[0]
            removed.add(id(batchnorm))
        bias = bias.astype(np.float32)
        layer = weights.input[0].removesuffix("_quantized").removesuffix(".weight")
        name = f"{layer}.folded"
        source = producer.get(conv.input[0])
        if source is not None and source.op_type == "DequantizeLinear" and np.size(_value(graph, source.input[1])) == 1:
            shape = (1, -1) + (1,) * (codes.ndim - 2)
            x_scale = np.float32(_value(graph, source.input[1]))
            added_initializers += [
                numpy_helper.from_array(codes, f"{name}_codes"),
                numpy_helper.from_array(np.array(0, codes.dtype), f"{name}_zero_point"),
                numpy_helper.from_array((x_scale * step * factor).astype(np.float32).reshape(shape), f"{name}_scale"),
                numpy_helper.from_array(bias.reshape(shape), f"{name}_bias")]
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
            replaced[id(conv)] = [
                onnx.helper.make_node("ConvInteger", [source.input[0], f"{name}_codes", source.input[2],
                                                      f"{name}_zero_point"], [f"{name}_sums"],
                                      name=f"{layer}_conv_integer", **attributes),
                onnx.helper.make_node("Cast", [f"{name}_sums"], [f"{name}_sums_float"], to=onnx.TensorProto.FLOAT,
                                      name=f"{layer}_cast"),
                onnx.helper.make_node("Mul", [f"{name}_sums_float", f"{name}_scale"], [f"{name}_scaled"],
                                      name=f"{layer}_scale"),
                onnx.helper.make_node("Add", [f"{name}_scaled", f"{name}_bias"], [output], name=f"{layer}_bias")]
            if len(consumers[source.output[0]]) == 1:
                removed.add(id(source))
            removed.add(id(weights))
            continue
        added_initializers += [numpy_helper.from_array(codes, f"{name}_codes"),
                               numpy_helper.from_array((step * factor).astype(np.float32), f"{name}_scale"),
                               numpy_helper.from_array(np.zeros(channels, codes.dtype), f"{name}_zero_point"),
                               numpy_helper.from_array(bias, f"{name}_bias")]
        weights.input[:] = [f"{name}_codes", f"{name}_scale", f"{name}_zero_point"]
        del weights.attribute[:]
        weights.attribute.append(onnx.helper.make_attribute("axis", 0))
        conv.input[:] = [conv.input[0], conv.input[1], f"{name}_bias"]
        conv.output[0] = output
    for gemm in [node for node in graph.node if node.op_type == "Gemm" and len(node.input) > 2]:
        _integer_gemm_bias(graph, gemm, producer, initializers, added_initializers, before)
    nodes = []
    for node in graph.node:
        if id(node) not in removed:
            nodes += before.get(id(node), []) + replaced.get(id(node), [node])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [initializer for initializer in list(graph.initializer) + added_initializers if initializer.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _integer_gemm_bias(graph: onnx.GraphProto, gemm: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                       initializers: dict[str, onnx.TensorProto], added: list[onnx.TensorProto],
                       before: dict[int, list[onnx.NodeProto]]) -> FastFormChange | None:
    """A Gemm of two quantized operands (a classifier) reads its float bias as INT32 codes at scale
    a_scale * b_scale behind a DequantizeLinear, as ONNX Runtime's QGemm fusion needs. Returns how far
    that moves the bias (None: the Gemm is left as it is)."""
    sources = [producer.get(name) for name in gemm.input[:2]]
    if (any(source is None or source.op_type != "DequantizeLinear" for source in sources)
            or gemm.input[2] not in initializers or _attribute(gemm, "transA", 0) or _attribute(gemm, "beta", 1.0) != 1.0
            or any(np.size(_value(graph, source.input[1])) != 1 for source in sources)):
        return None
    bias = numpy_helper.to_array(initializers[gemm.input[2]]).astype(np.float32)
    scale = np.float32(_value(graph, sources[0].input[1])) * np.float32(_value(graph, sources[1].input[1]))
    name = gemm.input[2]
    codes = np.clip(np.round(bias / scale), -2**31, 2**31 - 1).astype(np.int32)
    added += [numpy_helper.from_array(codes, f"{name}_codes"),
              numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
              numpy_helper.from_array(np.array(0, np.int32), f"{name}_zero_point")]
    before.setdefault(id(gemm), []).append(onnx.helper.make_node(
        "DequantizeLinear", [f"{name}_codes", f"{name}_scale", f"{name}_zero_point"], [f"{name}_dequantized"],
        name=f"{name}_bias_dequantize"))
    gemm.input[2] = f"{name}_dequantized"
    return FastFormChange(bias_of=_module_of(gemm) or "", bias_shift=_on_grid(codes, scale) - bias.astype(np.float64))


def _module_of(node: onnx.NodeProto) -> str | None:
    """The name of the PyTorch module whose forward wrote `node`, from the exporter's name scopes (the
    initializers' names cannot say: the optimizer merges equal ones, e.g. two fresh BatchNorms' betas)."""
    scopes = next((prop.value for prop in node.metadata_props if prop.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        return None
    names = ast.literal_eval(scopes)
    return names[-2] if len(names) >= 2 and names[-2] else None


def _on_grid(codes: np.ndarray, scale) -> np.ndarray:
    """The float64 value of INT32 bias codes at `scale` (what DequantizeLinear of them computes, in float64)."""
    return codes.astype(np.float64) * np.asarray(scale, np.float32).astype(np.float64)


def _fast_convolutions(proto: onnx.ModelProto, *, shift: bool = True, output_stds: float | None = None
                       ) -> tuple[tuple[QuantizedTensor, ...], tuple[FastFormChange, ...]]:
    """The fast form's graph pass: DQ -> Conv -> Q units that ONNX Runtime fuses into QLinearConv, for
    every convolution whose weights are integer codes (DequantizeLinear of an initializer at one step s).

    - A BatchNormalization that is the convolution's only reader is folded in exactly: with
      f[c] = gamma[c] / sqrt(var[c] + eps), the weights are the same codes at per-channel scales
      s * f[c] (DequantizeLinear, axis 0), the bias beta[c] + f[c] * (b[c] - mean[c]).
    - With a quantized input (UINT8 codes at scale x_scale), the bias is INT32 codes at x_scale * s * f[c]
      behind its own DequantizeLinear, rounded half to even. The codes of a layer narrower than 8 bits
      are stored times 2**k (and the scale divided by 2**k, the same weights): an accumulator unit, and so
      the bias's rounding, 2**k times finer (_code_shift).
    - A quantized-input convolution whose output reaches no quantizer (a ResNet block's last convolution
      and its downsample feed the residual Add) gets an 8-bit output quantizer, UINT8 at zero point 128:
      the PyTorch model has none. Its step comes from the folded BatchNorm's statistics (output_stds
      deviations around beta, OUTPUT_RANGE_STDS by default), so no data is needed.
    - A ReLU6 (Clip 0..6) between a convolution and an unsigned quantizer that saturates at or below 6
      anyway is a Relu (which ONNX Runtime drops before a zero-point-0 QuantizeLinear): the same values.

    A convolution with a float input (a first layer that keeps one) reads DequantizeLinear(codes, s * f[c],
    axis 0) and a float bias. Returns the added output quantizers, and every change from the PyTorch model
    by the PyTorch parameters and modules it concerns (named after the graph's initializers, which the
    exporter names after the model's parameters)."""
    output_stds = OUTPUT_RANGE_STDS if output_stds is None else output_stds
    graph = proto.graph
    _relu6_before_saturating_quantizers_as_relu(graph)
    producer = {output: node for node in graph.node for output in node.output}
    consumers = _consumers(graph)
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    graph_outputs = {output.name for output in graph.output}
    added_initializers: list[onnx.TensorProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # nodes to place right before a node
    after: dict[int, list[onnx.NodeProto]] = {}  # nodes to place right after a node
    removed: set[int] = set()
    added_quantizers = []
    changes: list[FastFormChange] = []
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        weights = producer.get(conv.input[1])
        if (weights is None or weights.op_type != "DequantizeLinear" or weights.input[0] not in initializers
                or len(consumers[weights.output[0]]) != 1 or np.size(_value(graph, weights.input[1])) != 1):
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in initializers:
            continue  # a bias computed in the graph: left as it is
        codes = numpy_helper.to_array(initializers[weights.input[0]])
        if codes.dtype != np.int8:
            continue
        step = np.float32(_value(graph, weights.input[1]))
        channels = codes.shape[0]
        bias = numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float32) \
            if len(conv.input) > 2 and conv.input[2] else np.zeros(channels, np.float32)
        factor, output, batchnorm = np.ones(channels, np.float32), conv.output[0], None
        readers = consumers.get(conv.output[0], [])
        if (len(readers) == 1 and readers[0].op_type == "BatchNormalization"
                and all(name in initializers for name in readers[0].input[1:5])):
            batchnorm = readers[0]
            gamma, beta, mean, var = (numpy_helper.to_array(initializers[name]).astype(np.float32)
                                      for name in batchnorm.input[1:5])
            factor = gamma / np.sqrt(var + np.float32(_attribute(batchnorm, "epsilon", 1e-5)))
            bias = beta + factor * (bias - mean)
            output = batchnorm.output[0]
            removed.add(id(batchnorm))
        bias = bias.astype(np.float32)
        # a zero factor (gamma 0) zeroes the channel: its codes become 0 at the step, so no scale is 0
        codes = np.where((factor == 0).reshape(-1, *[1] * (codes.ndim - 1)), 0, codes).astype(np.int8)
        scales = np.where(factor == 0, step, step * factor).astype(np.float32)
        layer = weights.input[0].removesuffix("_quantized").removesuffix(".weight")
        name = f"{layer}.folded"
        source = producer.get(conv.input[0])
        quantized_input = (source is not None and source.op_type == "DequantizeLinear"
                           and np.size(_value(graph, source.input[1])) == 1)
        add_output = (quantized_input and batchnorm is not None and output not in graph_outputs
                      and not _feeds_a_quantizer(output, consumers))
        integer_unit = quantized_input and (add_output or _feeds_a_quantizer(output, consumers))
        k = _code_shift(codes, _largest_input_code(graph, source, producer)) if integer_unit and shift else 0
        added_initializers += [numpy_helper.from_array((codes.astype(np.int32) << k).astype(np.int8), f"{name}_codes"),
                               numpy_helper.from_array((scales / np.float32(2 ** k)).astype(np.float32),
                                                       f"{name}_scale"),
                               numpy_helper.from_array(np.zeros(channels, np.int8), f"{name}_zero_point")]
        weights.input[:] = [f"{name}_codes", f"{name}_scale", f"{name}_zero_point"]
        del weights.attribute[:]
        weights.attribute.append(onnx.helper.make_attribute("axis", 0))
        if integer_unit:
            bias_scale = (np.float32(_value(graph, source.input[1])) * (scales / np.float32(2 ** k))).astype(np.float32)
            bias_codes = np.clip(np.round(bias / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
            # the parameter a PyTorch model would move to add the same bias: the folded BatchNorm's beta
            # (the bias is beta plus terms beta does not enter), else the convolution's own
            owner = batchnorm if batchnorm is not None else conv if len(conv.input) > 2 and conv.input[2] else None
            change = FastFormChange(bias_of=(_module_of(owner) or "") if owner is not None else "",
                                    bias_shift=_on_grid(bias_codes, bias_scale) - bias.astype(np.float64))
            added_initializers += [numpy_helper.from_array(bias_codes, f"{name}_bias_codes"),
                                   numpy_helper.from_array(bias_scale, f"{name}_bias_scale"),
                                   numpy_helper.from_array(np.zeros(channels, np.int32), f"{name}_bias_zero_point")]
            before.setdefault(id(conv), []).append(onnx.helper.make_node(
                "DequantizeLinear", [f"{name}_bias_codes", f"{name}_bias_scale", f"{name}_bias_zero_point"],
                [f"{name}_bias"], name=f"{layer}_bias_dequantize", axis=0))
        else:
            added_initializers.append(numpy_helper.from_array(bias, f"{name}_bias"))
        conv.input[:] = [conv.input[0], conv.input[1], f"{name}_bias"]
        conv.output[0] = output
        if not add_output:
            if integer_unit and change.bias_of:
                changes.append(change)
            continue
        # at least LSQ's smallest step: a BatchNorm with every gamma and beta 0 outputs zeros
        output_step = np.float32(max(float(np.max(np.abs(beta) + output_stds * np.abs(gamma))) / 127, 1e-5))
        added_quantizers.append(QuantizedTensor(layer=layer, kind="output", bits=8, signed=True, onnx_type="UINT8",
                                                scale=float(output_step), zero_point=128))
        changes.append(dataclasses.replace(change, output_of=_module_of(batchnorm), output_step=float(output_step)))
        quantized_name, dequantized_name = f"{layer}.output_quantized", f"{layer}.output_dequantized"
        added_initializers += [numpy_helper.from_array(np.array(output_step, np.float32), f"{layer}.output_scale"),
                               numpy_helper.from_array(np.array(128, np.uint8), f"{layer}.output_zero_point")]
        for reader in consumers.get(output, []):
            reader.input[:] = [dequantized_name if value == output else value for value in reader.input]
        after.setdefault(id(conv), []).extend([
            onnx.helper.make_node("QuantizeLinear", [output, f"{layer}.output_scale", f"{layer}.output_zero_point"],
                                  [quantized_name], name=f"{layer}_output_quantize"),
            onnx.helper.make_node("DequantizeLinear", [quantized_name, f"{layer}.output_scale",
                                                       f"{layer}.output_zero_point"], [dequantized_name],
                                  name=f"{layer}_output_dequantize")])
    for gemm in [node for node in graph.node if node.op_type == "Gemm" and len(node.input) > 2]:
        change = _integer_gemm_bias(graph, gemm, producer, initializers, added_initializers, before)
        changes += [change] if change is not None else []
    nodes = []
    for node in graph.node:
        if id(node) not in removed:
            nodes += before.get(id(node), []) + [node] + after.get(id(node), [])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [initializer for initializer in list(graph.initializer) + added_initializers if initializer.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return tuple(added_quantizers), tuple(changes)


def _largest_input_code(graph: onnx.GraphProto, dequantize: onnx.NodeProto,
                        producer: dict[str, onnx.NodeProto]) -> int:
    """The largest UINT8 code a DequantizeLinear reads: its integer Clip's upper bound, else 255."""
    clip = producer.get(dequantize.input[0])
    if clip is not None and clip.op_type == "Clip" and len(clip.input) > 2 and clip.input[2]:
        return int(_value(graph, clip.input[2]))
    return 255


def _code_shift(codes: np.ndarray, largest_input: int) -> int:
    """The largest k with codes * 2**k still within INT8 and two products with the largest input code
    within INT16 (see _INT16_MAX). A layer's codes are stored times 2**k and its scale divided by 2**k:
    the same weights, but an accumulator unit (input scale times weight scale) 2**k times finer, and so an
    INT32 bias rounded 2**k times closer to the float bias that PyTorch adds."""
    largest = max(int(np.abs(codes.astype(np.int32)).max(initial=0)), 1)
    low, high = int(codes.min(initial=0)), int(codes.max(initial=0))
    k = 0
    while (low * 2 ** (k + 1) >= -128 and high * 2 ** (k + 1) <= 127
           and 2 * largest_input * largest * 2 ** (k + 1) <= _INT16_MAX and k < 7):
        k += 1
    return k


def _feeds_a_quantizer(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """`name` goes straight to one QuantizeLinear, or through one Relu (which ONNX Runtime drops before
    a QuantizeLinear whose zero point is the type's lowest value)."""
    readers = consumers.get(name, [])
    if len(readers) == 1 and readers[0].op_type == "Relu":
        readers = consumers.get(readers[0].output[0], [])
    return len(readers) == 1 and readers[0].op_type == "QuantizeLinear"


def _relu6_before_saturating_quantizers_as_relu(graph: onnx.GraphProto) -> None:
    """Clip(x, 0, hi) whose one reader is a UINT8 QuantizeLinear (zero point 0, step s) followed by an
    integer Clip to at most Qp, with round(hi / s) >= Qp: the upper bound never acts, since the codes
    saturate at Qp anyway, so the Clip becomes a Relu."""
    consumers = _consumers(graph)
    for clip in [node for node in graph.node if node.op_type == "Clip" and len(node.input) == 3]:
        readers = consumers.get(clip.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or len(readers[0].input) < 3:
            continue
        quantize = readers[0]
        try:
            low, high = float(_value(graph, clip.input[1])), np.float32(_value(graph, clip.input[2]))
            step, zero = np.float32(_value(graph, quantize.input[1])), _value(graph, quantize.input[2])
        except StopIteration:  # a bound computed in the graph
            continue
        if low != 0 or zero.dtype != np.uint8 or int(zero) != 0:
            continue
        clamps = consumers.get(quantize.output[0], [])
        top = 255
        if len(clamps) == 1 and clamps[0].op_type == "Clip" and len(clamps[0].input) > 2 and clamps[0].input[2]:
            top = int(_value(graph, clamps[0].input[2]))
        if np.round(high / step) >= top:
            clip.op_type = "Relu"
            del clip.input[1:]


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
