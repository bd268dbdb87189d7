"""Quantization core speed, measured in one process; ratios printed last.

(a) quantized conv forward+backward vs plain conv, (b) our fused LSQ function vs the composed-op
formulation (detach tricks), (c) one joint step vs (|B|+1) plain FP steps of resnet18 at 32x32.

    .venv/bin/python benchmarks/bench_quant.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch
from torch import nn

from orchestrator.modelinfo import build_model
from orchestrator.quant.lsq import levels, lsq_fake_quant
from orchestrator.quant.modules import QConv2d
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.steps import joint_step, plain_step

BITS = [6, 5, 4, 3, 2]


def composed_fake_quant(x: torch.Tensor, s: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The usual LSQ formulation: gradient scale and rounding through `(y - x).detach() + x`."""
    qn, qp = levels(bits, signed)
    g = 1.0 / math.sqrt(x.numel() * qp)
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s_scaled


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_cases(repeats: int) -> list[tuple[str, float, float, float]]:
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

        rows.append((
            f"{channels}->{channels} @{size}x{size} b64",
            median_seconds(step(plain), repeats),
            median_seconds(step(quant), repeats),
            median_seconds(fake_quant(lsq_fake_quant), repeats) / median_seconds(fake_quant(composed_fake_quant), repeats),
        ))
    return rows


def joint_vs_fp(repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    criterion = nn.CrossEntropyLoss()
    fp = build_model("resnet18", 10)
    fp_opt = torch.optim.SGD(fp.parameters(), lr=0.01)
    joint = build_model("resnet18", 10)
    quantize_model(joint, bits=BITS, input_size=32)
    joint_opt = torch.optim.SGD(joint.parameters(), lr=0.01)
    rng = random.Random(0)
    fp_time = median_seconds(lambda: [plain_step(fp, images, labels, criterion, fp_opt) for _ in range(len(BITS) + 1)],
                             repeats)
    joint_time = median_seconds(lambda: joint_step(joint, images, labels, BITS, criterion, joint_opt, rng), repeats)
    return fp_time, joint_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    rows = conv_cases(args.repeats)
    for name, plain, quant, _ in rows:
        print(f"conv {name}: plain {plain * 1e3:.1f} ms, quantized (W4A4) {quant * 1e3:.1f} ms")
    fp_time, joint_time = joint_vs_fp(args.repeats)
    print(f"resnet18 32x32 b64: {len(BITS) + 1} FP steps {fp_time * 1e3:.0f} ms, one joint step {joint_time * 1e3:.0f} ms")
    print("ratios:")
    for name, plain, quant, fused_ratio in rows:
        print(f"  (a) quantized/plain conv fwd+bwd {name}: {quant / plain:.2f}x (goal <= 1.3x)")
        print(f"  (b) fused/composed fake-quant fwd+bwd {name}: {fused_ratio:.2f}x (goal <= 0.7x)")
    print(f"  (c) joint step / {len(BITS) + 1} FP steps, resnet18 32x32: {joint_time / fp_time:.2f}x")


if __name__ == "__main__":
    main()
