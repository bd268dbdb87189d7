"""An exported model checked in ONNX Runtime (CPU) against the PyTorch model it came from, on the same
batches: how often both pick the same class, each one's top-1, and the largest logit difference.
Layer 1: torch and onnxruntime, no Ray, no MLflow."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

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
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
