"""Quantization core speed, measured in one process; ratios printed last.

(a) quantized conv forward+backward vs plain conv, (b) our fused LSQ function vs the composed-op
formulation (detach tricks), (c) one joint step vs (|B|+1) plain FP steps of resnet18 at 32x32.
(a) and (c) run eagerly and compiled (torch.compile, inductor, as `training.compile: on` trains); a
compiled case's compile time is its first call less its median call.

    .venv/bin/python benchmarks/bench_quant.py [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

from orchestrator.models.info import build_model
from orchestrator.quant.lsq import levels, lsq_fake_quant
from orchestrator.quant.modules import QConv2d
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.compiled import CompiledPass
from orchestrator.train.steps import forward_loss, joint_step, plain_step

BITS = [6, 5, 4, 3, 2]


def composed_fake_quant(x: torch.Tensor, s: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The usual LSQ formulation: gradient scale and rounding through `(y - x).detach() + x`."""
    qn, qp = levels(bits, signed)
    g = 1.0 / math.sqrt(x.numel() * qp)
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s_scaled


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call: warm-up, or compilation plus one call; median of `repeats` more)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def median_seconds(fn, repeats: int) -> float:
    return timed(fn, repeats)[1]


def conv_cases(repeats: int, compile_too: bool) -> list[tuple[str, float, float, float, tuple | None]]:
    """Per shape: plain and W4A4 quantized conv (eager), fused/composed ratio, and with `compile_too`
    (plain compiled, quantized compiled, quantized compile seconds)."""
    rows = []
    for channels, size in ((64, 56), (256, 14)):
        torch.manual_seed(0)
        x = torch.relu(torch.randn(64, channels, size, size))
        plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        quant = QConv2d.from_float(nn.Conv2d(channels, channels, 3, padding=1, bias=False), [4], [4])

        def step(layer):
            def run():
                inp = x.clone().requires_grad_()
                layer(inp).sum().backward()
            return run

        step_s = torch.tensor(0.1, requires_grad=True)

        def fake_quant(fn):
            def run():
                inp = x.clone().requires_grad_()
                fn(inp, step_s, 4, False).sum().backward()
            return run

        compiled = None
        if compile_too:
            quant(x)  # lazy init and sign detection stay eager (as in training)
            _, plain_compiled = timed(step(torch.compile(plain, dynamic=False)), repeats)
            quant_compiled_first, quant_compiled = timed(step(torch.compile(quant, dynamic=False)), repeats)
            compiled = (plain_compiled, quant_compiled, quant_compiled_first - quant_compiled)
        rows.append((
            f"{channels}->{channels} @{size}x{size} b64",
            median_seconds(step(plain), repeats),
            median_seconds(step(quant), repeats),
            median_seconds(fake_quant(lsq_fake_quant), repeats) / median_seconds(fake_quant(composed_fake_quant), repeats),
            compiled,
        ))
    return rows


def joint_vs_fp(repeats: int, compile_too: bool) -> dict[str, float]:
    """Seconds of (|B|+1) FP steps and of one joint step, eager and (with `compile_too`) compiled,
    and the compile seconds of each compiled case."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    criterion = nn.CrossEntropyLoss()
    fp = build_model("resnet18", 10)
    fp_opt = torch.optim.SGD(fp.parameters(), lr=0.01)
    joint = build_model("resnet18", 10)
    quantize_model(joint, bits=BITS, input_size=32)
    joint_opt = torch.optim.SGD(joint.parameters(), lr=0.01)
    rng = random.Random(0)
    passes = len(BITS) + 1
    def fp_steps(compiled: CompiledPass | None = None) -> None:
        for _ in range(passes):
            plain_step(fp, images, labels, criterion, fp_opt, compiled=compiled)

    def one_joint_step(compiled: CompiledPass | None = None) -> None:
        joint_step(joint, images, labels, BITS, criterion, joint_opt, rng, compiled=compiled)

    times = {"fp": median_seconds(fp_steps, repeats), "joint": median_seconds(one_joint_step, repeats)}
    if compile_too:
        fp_pass = CompiledPass(fp, functools.partial(forward_loss, fp, criterion=criterion, bf16=False))
        first, times["fp_compiled"] = timed(lambda: fp_steps(fp_pass), repeats)
        times["fp_compile_s"] = first - times["fp_compiled"]
        joint_pass = CompiledPass(joint, functools.partial(forward_loss, joint, criterion=criterion, bf16=False))
        graphs_before = counters["stats"]["unique_graphs"]
        first, times["joint_compiled"] = timed(lambda: one_joint_step(joint_pass), repeats)
        times["joint_compile_s"] = first - times["joint_compiled"]
        times["joint_compiled_passes"] = joint_pass.calls
        times["joint_graphs"] = counters["stats"]["unique_graphs"] - graphs_before  # compilations, recompiles too
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager cases only")
    args = parser.parse_args()
    compile_too = not args.no_compile
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    rows = conv_cases(args.repeats, compile_too)
    for name, plain, quant, _, compiled in rows:
        print(f"conv {name}: plain {plain * 1e3:.1f} ms, quantized (W4A4) {quant * 1e3:.1f} ms")
        if compiled:
            print(f"conv {name} compiled: plain {compiled[0] * 1e3:.1f} ms, quantized (W4A4) "
                  f"{compiled[1] * 1e3:.1f} ms (compile {compiled[2]:.1f} s)")
    times = joint_vs_fp(args.repeats, compile_too)
    passes = len(BITS) + 1
    print(f"resnet18 32x32 b64: {passes} FP steps {times['fp'] * 1e3:.0f} ms, "
          f"one joint step {times['joint'] * 1e3:.0f} ms")
    if compile_too:
        print(f"resnet18 32x32 b64 compiled: {passes} FP steps {times['fp_compiled'] * 1e3:.0f} ms (compile "
              f"{times['fp_compile_s']:.1f} s), one joint step {times['joint_compiled'] * 1e3:.0f} ms (compile "
              f"{times['joint_compile_s']:.1f} s; {times['joint_compiled_passes']} compiled passes at random "
              f"policies, {times['joint_graphs']} graph(s) compiled)")
    print("ratios:")
    for name, plain, quant, fused_ratio, compiled in rows:
        print(f"  (a) quantized/plain conv fwd+bwd {name}, eager: {quant / plain:.2f}x (goal <= 1.1x)")
        if compiled:
            print(f"  (a) quantized/plain conv fwd+bwd {name}, compiled: {compiled[1] / compiled[0]:.2f}x "
                  f"(vs eager plain {compiled[1] / plain:.2f}x; goal <= 1.1x)")
        print(f"  (b) fused/composed fake-quant fwd+bwd {name}: {fused_ratio:.2f}x (goal <= 0.7x)")
    print(f"  (c) joint step / {passes} FP steps, resnet18 32x32, eager: {times['joint'] / times['fp']:.2f}x "
          "(goal <= 1.2x)")
    if compile_too:
        print(f"  (c) joint step / {passes} FP steps, resnet18 32x32, compiled: "
              f"{times['joint_compiled'] / times['fp_compiled']:.2f}x (vs eager FP steps "
              f"{times['joint_compiled'] / times['fp']:.2f}x; goal <= 1.2x)")


if __name__ == "__main__":
    main()
