"""An exported model checked in ONNX Runtime (CPU) against the PyTorch model it came from, on the same
batches: how often both pick the same class, each one's top-1, and the largest logit difference.
Layer 1: torch and onnxruntime, no Ray, no MLflow."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.quant.onnx_export import INPUT_NAME

# the top-1 agreement an export must reach: rounding the same value on both sides of a .5 boundary (a
# division in another order) may move one integer code, and rarely a class
MIN_AGREEMENT = 0.999


@dataclass(frozen=True)
class OnnxAgreement:
    samples: int
    agreement: float  # fraction of samples for which ONNX Runtime and PyTorch pick the same class
    onnx_top1: float
    torch_top1: float
    max_logit_diff: float

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT

    def metrics(self) -> dict[str, float]:
        return {"onnx_top1": self.onnx_top1, "onnx_agreement": self.agreement,
                "onnx_max_logit_diff": self.max_logit_diff}

    def summary(self) -> str:
        return (f"ONNX Runtime vs PyTorch on {self.samples} images: top-1 agreement {100 * self.agreement:.2f}%, "
                f"largest logit difference {self.max_logit_diff:.3g}, top-1 {100 * self.onnx_top1:.2f}% "
                f"(PyTorch {100 * self.torch_top1:.2f}%)")


def cpu_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU provider at its default optimization level (as a user's
    session would be); `threads` 0 lets ONNX Runtime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return _session(path, options)


def _session(path: str | Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime's own exception classes (Fail, InvalidGraph, ...) share no base
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"ONNX Runtime's default CPU session refuses the exported graph: {reason}") from error


@torch.no_grad()
def compare_with_torch(model: nn.Module, onnx_path: str | Path,
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> OnnxAgreement:
    """Run `model` (on the CPU, in eval mode) and the ONNX model on every (images, labels) batch."""
    session = cpu_session(onnx_path)
    model = model.cpu().eval()
    samples = same = onnx_correct = torch_correct = 0
    max_diff = 0.0
    for images, labels in batches:
        expected = model(images).numpy()
        [logits] = session.run(None, {INPUT_NAME: images.numpy()})
        labels = labels.numpy()
        samples += len(labels)
        same += int((logits.argmax(1) == expected.argmax(1)).sum())
        onnx_correct += int((logits.argmax(1) == labels).sum())
        torch_correct += int((expected.argmax(1) == labels).sum())
        max_diff = max(max_diff, float(np.abs(logits - expected).max()))
    if not samples:
        raise ValueError("compare_with_torch: no batches")
    return OnnxAgreement(samples, same / samples, onnx_correct / samples, torch_correct / samples, max_diff)


INTEGER_KERNELS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                             "QGemm", "DynamicQuantizeMatMul", "MatMulNBits"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm",
                           "FusedGemm"})


@dataclass(frozen=True)
class RuntimeKernels:
    """The convolutions and matrix products of ONNX Runtime's optimized graph (CPU, default session):
    how many run as integer kernels, and the float ones by name (the node's weight input, else the node)."""

    integer: dict[str, int]  # operator -> count
    float_layers: tuple[str, ...]

    @property
    def integer_count(self) -> int:
        return sum(self.integer.values())

    def summary(self) -> str:
        total = self.integer_count + len(self.float_layers)
        kernels = ", ".join(f"{op} x{n}" for op, n in sorted(self.integer.items())) or "none"
        floats = ", ".join(self.float_layers) or "none"
        return (f"ONNX Runtime (CPU) runs {self.integer_count} of {total} convolutions and matrix products as integer "
                f"kernels ({kernels}); in float: {floats}")

    def metrics(self) -> dict[str, float]:
        return {"onnx_integer_kernels": self.integer_count, "onnx_float_kernels": len(self.float_layers)}


def runtime_kernels(path: str | Path) -> RuntimeKernels:
    """Read ONNX Runtime's optimized graph of the model at `path` (saved by a default CPU session)."""
    with tempfile.TemporaryDirectory() as directory:
        optimized = Path(directory) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # it warns that an optimized graph is specific to this machine
        _session(path, options)
        graph = onnx.load(optimized, load_external_data=False).graph
    constants = {initializer.name for initializer in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    integer = Counter(node.op_type for node in graph.node if node.op_type in INTEGER_KERNELS)
    float_layers = tuple(_layer_name(node, constants, producer) for node in graph.node if node.op_type in FLOAT_KERNELS)
    return RuntimeKernels(dict(integer), float_layers)


def _layer_name(node: onnx.NodeProto, constants: set[str], producer: dict[str, onnx.NodeProto]) -> str:
    """The layer a float kernel computes, read from its weight's name (through its DequantizeLinear), else
    from its bias's: ONNX Runtime's NCHWc layout names a reordered weight `reorder`."""
    names = [producer[name].input[0] if name in producer and producer[name].op_type == "DequantizeLinear" else name
             for name in node.input[1:]]
    weight = next((name for name in names if name in constants and not name.startswith("reorder")), None)
    if weight is None:
        return f"{node.name} ({node.op_type})"
    layer = weight.split(".folded_")[0].removesuffix("_bias").removesuffix("_quantized").removesuffix(".weight")
    return f"{layer.removesuffix('.bias')} ({node.op_type})"
