"""Compiled training passes: a stage's forward, loss and backward through torch.compile (inductor).

One `CompiledPass` per worker and stage: compiled on its first use, then reused by every step of
every epoch (the step sizes' bit-widths, the random policy and the BatchNorm copy are tensors in
the graph, so a new policy is no recompile). Inductor keeps what it generates in its on-disk
caches (FX graph and AOTAutograd caches, under the system temp directory), so the next worker on
the same machine with the same model and batch shape loads the kernels instead of generating them.

A pass runs eagerly when the compiled graph cannot serve it: before every quantizer is initialised
(lazy init and sign detection read the first batch in Python) and for a batch of another shape
than the first (the last partial batch of an epoch: one eager pass is cheaper than a second
compilation). The eager and compiled passes compute the same loss and gradients to float
tolerance (tests/test_compiled.py).

Layer 1: plain torch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.quant.lsq import LsqQuantizer
from orchestrator.quant.surgery import unwrap

log = logging.getLogger("limpq")

CompileMode = Literal["auto", "on", "off"]
ForwardLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def compiler_missing(device_type: str) -> str | None:
    """Why inductor cannot generate code for `device_type` ("cpu", "cuda") on this machine, or None."""
    # deferred: importing inductor takes a second or two, and only a compiling worker needs it
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor's GPU code generator)"
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except (InvalidCxxCompiler, OSError) as error:
            return f"no C++ compiler for inductor's CPU code ({str(error).splitlines()[0]})"
        return None
    return f"inductor does not generate code for {device_type} devices"


@dataclass(frozen=True)
class CompileDecision:
    enabled: bool
    reason: str  # one line, logged as an MLflow tag of the stage run


def decide_compile(mode: CompileMode, device_type: str) -> CompileDecision:
    """Whether a worker on `device_type` compiles its training steps.

    `auto` compiles on CUDA, where the quantizers' elementwise kernels are memory-bound and the
    convolutions cheap, and stays eager on CPU: there, a cold compilation of resnet18 takes minutes
    on two cores and a warm one tens of seconds, while the steps it speeds up are dominated by the
    convolutions themselves (benchmarks/bench_compile.py measures both; README benchmark table).
    `on` compiles wherever inductor has a code generator (`compiler_missing` is checked before work
    starts); `off` never touches the compiler.
    """
    if mode == "off":
        return CompileDecision(False, "training.compile: off")
    missing = compiler_missing(device_type)
    if mode == "on":
        if missing:
            raise UserError(f"training.compile: on, but {missing}; install it or set training.compile: auto or off")
        return CompileDecision(True, "training.compile: on")
    if device_type != "cuda":
        return CompileDecision(False, f"training.compile: auto, eager on {device_type} (compiling costs more than it "
                                      "saves at CPU speeds)")
    if missing:
        return CompileDecision(False, f"training.compile: auto, eager: {missing}")
    return CompileDecision(True, "training.compile: auto, compiled on cuda")


class CompiledPass:
    """forward + loss (compiled) and backward of one model's training pass.

    `forward_loss(images, labels) -> (logits, loss)` is what the eager pass runs; this class runs
    the same function through torch.compile. `fallback`: a compilation error (auto mode) logs one
    warning and leaves every later pass eager instead of stopping the run.
    """

    def __init__(self, model: nn.Module, forward_loss: ForwardLoss, fallback: bool = False) -> None:
        self._quantizers = [m for m in unwrap(model).modules() if isinstance(m, LsqQuantizer)]
        self._initialized = not self._quantizers
        self._compiled = torch.compile(forward_loss, dynamic=False)
        self._fallback = fallback
        self._shape: torch.Size | None = None
        self.failed: str | None = None
        self.first_call_seconds: float | None = None  # compilation plus one pass
        self._pass_seconds: deque[float] = deque(maxlen=64)  # the latest compiled passes after the first
        self.calls = 0

    def serves(self, images: torch.Tensor) -> bool:
        """Whether the compiled graph runs this batch (else the caller runs the eager pass)."""
        if self.failed is not None or (self._shape is not None and images.shape != self._shape):
            return False
        if not self._initialized:  # one sync per pass until the quantizers are ready, none after
            self._initialized = bool(torch.stack([q.is_initialized() for q in self._quantizers]).all())
        return self._initialized

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Runs the compiled pass, backward included; returns (logits, loss), or None when it could
        not compile and falls back (nothing was accumulated: the caller runs the eager pass)."""
        first = self._shape is None
        started = time.perf_counter()
        try:
            logits, loss = self._compiled(images, labels)
            loss.backward()
        except Exception as error:  # dynamo, AOTAutograd and inductor each raise their own kinds
            if not (first and self._fallback):
                raise
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("training.compile: auto: the model did not compile (%s); training eagerly", self.failed)
            return None
        if first:
            self._shape = images.shape
            self.first_call_seconds = time.perf_counter() - started
        else:
            self._pass_seconds.append(time.perf_counter() - started)
        self.calls += 1
        return logits, loss

    @property
    def compile_seconds(self) -> float | None:
        """Wall time the compilation cost: the first compiled pass less the median later one (the
        whole first pass while there is no later one yet); None before the first."""
        if self.first_call_seconds is None:
            return None
        steady = statistics.median(self._pass_seconds) if self._pass_seconds else 0.0
        return max(0.0, self.first_call_seconds - steady)
