"""LSQ fake quantization (docs/method.md §2.1) with one learnable step size per candidate bit-width."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.common.collective import mean_across_workers, reduced

STEP_MIN, STEP_MAX = 1e-5, 1.0
FULL_RANGE_BITS = 8  # weight steps from this many bits up start at max|w| / Qp


def levels(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): the integer range of a `bits`-bit code."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class LsqFakeQuant(torch.autograd.Function):
    """q(x) = round(clamp(x / s, Qn, Qp)) * s with LSQ's analytic backward.

    One autograd node instead of the composed detach-trick chain: it saves only `x` and `s` and
    recomputes x / s in backward, so less memory is held between forward and backward.
    The step size is clamped to [1e-5, 1] when used, with clamp's own gradient (docs/method.md §2.1, as the
    reference): zero for a step size outside the range, which then stays where it is.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
        s = step.clamp(STEP_MIN, STEP_MAX)
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return (x / s).clamp_(qn, qp).round_().mul_(s)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, step = ctx.saved_tensors
        s = step.clamp(STEP_MIN, STEP_MAX)
        v = x / s
        v_clamped = v.clamp(ctx.qn, ctx.qp)
        inside = v_clamped == v
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d q / d s = round(v) - v inside the range, Qn below it, Qp above it
            #           = round(clamp(v)) - v * inside
            ds = v_clamped.round_().sub_(v.mul_(inside))
            grad_s = torch.dot(grad_out.reshape(-1), ds.reshape(-1)).mul_(ctx.grad_scale).reshape(s.shape)
            grad_s = grad_s * ((step >= STEP_MIN) & (step <= STEP_MAX))  # clamp's own gradient
        return grad_x, grad_s, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    qn, qp = levels(bits, signed)
    return LsqFakeQuant.apply(x, step, qn, qp, 1.0 / math.sqrt(x.numel() * qp))


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] for a 0-d index tensor, as a graph op: plain indexing would read the index as a
    Python int (`.item()`), which a compiled graph cannot do without breaking."""
    return values.index_select(0, index.reshape(1)).squeeze(0)


def lsq_fake_quant_traceable(x: torch.Tensor, step: torch.Tensor, bits: torch.Tensor,
                             signed: torch.Tensor) -> torch.Tensor:
    """`lsq_fake_quant` for torch.compile: the same values and gradients from differentiable tensor
    ops, with the bit-width and the sign as 0-d tensors. Nothing here is a Python number the compiler
    would specialise on, so one graph serves every bit-width and every policy (no recompile when the
    random pass changes bits), and inductor fuses the elementwise ops into the neighbouring kernels."""
    half = torch.exp2(bits - 1)
    qp = torch.where(signed, half - 1, 2 * half - 1)
    qn = torch.where(signed, -half, torch.zeros_like(half))
    s = step.clamp(STEP_MIN, STEP_MAX)  # clamp's own gradient, as in LsqFakeQuant
    s = s.detach() + (s - s.detach()) * torch.rsqrt(x.numel() * qp)  # value s, gradient scaled by g
    v = x / s
    # the straight-through mask written out, inclusive at Qn and Qp as LsqFakeQuant's: clamp's own
    # backward, once decomposed into maximum/minimum, would pass half the gradient at a tie (x == 0 == Qn)
    inside = (v.detach() >= qn) & (v.detach() <= qp)
    codes = v.detach().clamp(qn, qp).round()
    return (codes + (v - v.detach()) * inside) * s  # value codes * s; d/dx = inside, d/ds = codes - v * inside


class LsqQuantizer(nn.Module):
    """Per-tensor LSQ quantizer holding a step size s[b] for every candidate bit-width b.

    `active_bits` picks the step size used by the next forward (None: pass through in full precision).
    Each s[b] is its own Parameter so that an optimizer step after a pass at one bit-width leaves the
    others untouched. Step sizes are initialised lazily on the first forward at each bit-width
    (docs/method.md §2.1 formulas); activation inits are averaged across data-parallel workers.
    Whether activations are signed is read from the first batch this quantizer sees. Kind "output" is an
    activation quantizer that no layer reads as its input: one the fast ONNX form needs (quant.deployed).
    """

    def __init__(self, bits: Sequence[int], kind: Literal["weight", "act", "output"]) -> None:
        super().__init__()
        if not bits:
            raise ValueError("LsqQuantizer needs at least one bit-width")
        self.bits = tuple(int(b) for b in bits)
        self.kind = kind
        self.step = nn.ParameterDict({str(b): nn.Parameter(torch.ones(())) for b in self.bits})
        self.register_buffer("initialized", torch.zeros(len(self.bits), dtype=torch.bool))
        # -1 unknown, 0 unsigned, 1 signed; weights are always signed
        self.register_buffer("signed_state", torch.tensor(1 if kind == "weight" else -1, dtype=torch.int8))
        # the compiled forward reads the active bit-width from these tensors, not from Python numbers;
        # not persistent: the checkpoint layout stays step.<b>, initialized, signed_state
        self.register_buffer("candidate_bits", torch.tensor(self.bits, dtype=torch.float32), persistent=False)
        self.register_buffer("active_index", torch.zeros((), dtype=torch.long), persistent=False)
        self._active_bits: int | None = None
        self._enabled = False  # active_bits is not None: the one Python value the compiled forward reads
        self.active_bits = self.bits[0] if len(self.bits) == 1 else None

    @property
    def active_bits(self) -> int | None:
        return self._active_bits

    @active_bits.setter
    def active_bits(self, bits: int | None) -> None:
        if bits is not None and bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not a candidate of this quantizer {list(self.bits)}")
        if bits is not None and bits != self._active_bits:
            self.active_index.fill_(self.bits.index(bits))
        self._active_bits = bits
        self._enabled = bits is not None

    @property
    def signed(self) -> bool:
        return bool(self.signed_state.item() == 1)

    @torch.no_grad()
    def _detect_sign(self, x: torch.Tensor) -> None:
        has_negative = reduced((x.min() < 0).float(), dist.ReduceOp.MAX)
        self.signed_state.fill_(int(has_negative.item() > 0))

    @torch.no_grad()
    def _init_step(self, x: torch.Tensor, bits: int) -> None:
        qn, qp = levels(bits, self.signed)
        if self.kind == "weight" and bits >= FULL_RANGE_BITS:
            # 8-bit levels cover every weight: a classifier's heavy-tailed weights beyond 3 std would
            # clip, and the clipped ones' gradients (Qp each) throw the step size below zero within
            # two SGD steps of fine-tuning, where it stays (docs/method.md §2.1)
            value = x.abs().max() / qp
        elif self.kind == "weight":
            mean, std = x.mean(), x.std()
            value = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / 2 ** (bits - 1)
        else:
            value = mean_across_workers(2 * x.abs().mean() / math.sqrt(qp))
        self.step[str(bits)].copy_(value)  # not clamped (docs/method.md §2.1): an init above 1 keeps its rank
        self.initialized[self.bits.index(bits)] = True

    def step_size(self, bits: int) -> float:
        """The raw learned step size at `bits`: the importance indicator (docs/method.md §4)."""
        return float(self.step[str(bits)].detach())

    def effective_step_size(self, bits: int) -> float:
        """The step size the forward pass uses at `bits` (clamped to [1e-5, 1])."""
        return float(self.step[str(bits)].detach().clamp(STEP_MIN, STEP_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return x
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # under autocast: x / s and its rounding in float32, where the code levels are exact
        if torch.compiler.is_compiling():
            return self._traceable_forward(x)
        bits = self._active_bits
        if self.signed_state.item() < 0:
            self._detect_sign(x)
        if not self.initialized[self.bits.index(bits)]:
            self._init_step(x.detach(), bits)
        return lsq_fake_quant(x, self.step[str(bits)], bits, self.signed)

    def _traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward inside torch.compile. Lazy init and sign detection read tensors in Python, so
        they stay eager: a compiled step runs only once every step size is initialised
        (`is_initialized`); the step size and the levels are picked by tensor indexing. Stacking the
        step sizes gives the inactive ones a zero gradient rather than none; the joint step leaves
        all-zero gradients out of the optimizer step (docs/method.md §3.1), so the update is the same."""
        if len(self.bits) == 1:
            step = self.step[str(self.bits[0])]
        else:
            step = pick(torch.stack([self.step[str(b)] for b in self.bits]), self.active_index)
        return lsq_fake_quant_traceable(x, step, pick(self.candidate_bits, self.active_index), self.signed_state > 0)

    def is_initialized(self) -> torch.Tensor:
        """A 0-d bool tensor: every step size initialised and the sign known."""
        return self.initialized.all() & (self.signed_state >= 0)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={list(self.bits)}, active={self.active_bits}"
