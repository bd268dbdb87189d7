"""ONNX Runtime (CPU, default session) latency and file size of our three export forms against the FP32
export of the same model and ONNX Runtime's own int8 static quantization of that FP32 model (the anchor:
`quant_pre_process` + `quantize_static`, QDQ, per-channel weights, calibrated on a few random images),
in one process; ratios printed last. For each file: the convolutions and matrix products ONNX Runtime's
optimized graph runs as integer kernels, and the largest logit difference to the PyTorch model.

The models are torchvision's resnet18 and mobilenet_v2 at 224x224 (10 classes), each quantized at a
seeded random mixed policy (weights 2-4 bits, activations 3-4 bits, the fixed first conv and
classifier at 8 bits) with step sizes and BatchNorm statistics set on random images: latency and size
depend on the graph and the bit-widths, not on trained values. The fast file is exported from the model as
a trial deploys it (`quant.deployed`), and compared with that model.

    .venv/bin/python benchmarks/bench_export.py [--models resnet18 mobilenet_v2] [--input-size 224]
        [--threads 0] [--repeats 10] [--profile]

`--profile` adds, per file at batch 32, where ONNX Runtime's time goes: its profiler's kernel time per
operator type, in ms per run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from orchestrator.models.info import build_model, split_layers, trace_layers
from orchestrator.quant.deployed import deploy
from orchestrator.quant.onnx_check import cpu_session, runtime_kernels
from orchestrator.quant.onnx_export import INPUT_NAME, export_onnx, float_copy
from orchestrator.quant.surgery import quantize_model

MEGABYTE = 2**20
BATCHES = (1, 32)


def random_mixed_model(arch: str, input_size: int, seed: int = 0) -> torch.nn.Module:
    model = build_model(arch, 10)
    searchable, _ = split_layers(trace_layers(model, input_size), None)
    rng = random.Random(seed)
    quantize_model(model, policy={layer.name: (rng.choice([2, 3, 4]), rng.choice([3, 4])) for layer in searchable},
                   input_size=input_size)
    model.train()
    with torch.no_grad():  # step sizes (and BN statistics) from random images, as a first training batch sets them
        for step in range(3):
            model(torch.randn(8, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed + step)))
    return model.eval()


class RandomImages(CalibrationDataReader):
    """A few batches of N(0, 1) images: ONNX Runtime's calibration reader for the int8 anchor."""

    def __init__(self, size: int, batches: int = 4) -> None:
        generator = torch.Generator().manual_seed(123)
        self.batches = iter([{INPUT_NAME: torch.randn(8, 3, size, size, generator=generator).numpy()}
                             for _ in range(batches)])

    def get_next(self):
        return next(self.batches, None)


def ort_int8(fp32: Path, out: Path, size: int) -> Path:
    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))  # shape inference and ONNX Runtime's graph optimizations (BN folded)
    quantize_static(str(prepared), str(out), RandomImages(size), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def median_ms(runner: onnxruntime.InferenceSession, images: np.ndarray, repeats: int) -> float:
    for _ in range(2):  # warm-up: first runs allocate and pick kernels
        runner.run(None, {INPUT_NAME: images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(None, {INPUT_NAME: images})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def operator_ms(path: Path, images: np.ndarray, threads: int, runs: int = 3) -> Counter:
    """ONNX Runtime's profiler: kernel time per operator type, in ms per run (after one warm-up run)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {INPUT_NAME: images})
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {INPUT_NAME: images})
    trace = json.loads(Path(session.end_profiling()).read_text())
    totals = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return totals


def bench(arch: str, size: int, threads: int, repeats: int, directory: Path,
          profile: bool = False) -> dict[str, dict]:
    model = random_mixed_model(arch, size)
    example = torch.zeros(1, 3, size, size)
    files = {"fp32": export_onnx(float_copy(model), example, directory / f"{arch}-fp32.onnx").path}
    files["ort-int8"] = ort_int8(files["fp32"], directory / f"{arch}-ort-int8.onnx", size)
    deployment = deploy(model, example, directory / f"{arch}-fast.onnx")  # what a trial registers
    deployed, files["fast"] = deployment.model, deployment.export.path
    files["integer"] = export_onnx(model, example, directory / f"{arch}-integer.onnx", form="integer").path
    files["compact"] = export_onnx(model, example, directory / f"{arch}-compact.onnx", form="compact").path
    results = {}
    for name, path in files.items():
        kernels = runtime_kernels(path)
        runner = cpu_session(path, threads)
        row = {"size_mb": path.stat().st_size / MEGABYTE, "kernels": kernels}
        for batch in BATCHES:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).numpy()
            with torch.no_grad():
                reference = float_copy(model) if name in ("fp32", "ort-int8") else deployed if name == "fast" else model
                expected = reference(torch.from_numpy(images))
            row[f"diff{batch}"] = float(np.abs(runner.run(None, {INPUT_NAME: images})[0] - expected.numpy()).max())
            row[f"ms{batch}"] = median_ms(runner, images, repeats)
        results[name] = row
        print(f"{arch} {name:>8}: {row['size_mb']:7.2f} MB, batch 1 {row['ms1']:8.1f} ms, batch 32 "
              f"{row['ms32']:9.1f} ms; largest logit difference to its PyTorch model {row['diff32']:.3g}; "
              f"{kernels.summary()}", flush=True)
        if profile:
            times = operator_ms(path, images, threads)
            print(f"{arch} {name:>8}: batch {images.shape[0]} kernel time {sum(times.values()):.1f} ms per run: "
                  + ", ".join(f"{op} {ms:.1f}" for op, ms in times.most_common(8)), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its choice)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per batch size (median reported)")
    parser.add_argument("--profile", action="store_true", help="where the time goes, per operator type (batch 32)")
    args = parser.parse_args()
    print(f"ONNX Runtime {onnxruntime.__version__}, CPU threads {args.threads or 'default'}, "
          f"{args.input_size}x{args.input_size}, median of {args.repeats} runs")
    with tempfile.TemporaryDirectory() as directory:
        results = {arch: bench(arch, args.input_size, args.threads, args.repeats, Path(directory), args.profile)
                   for arch in args.models}
    print("\nratios (above 1: ours faster / smaller)")
    for arch, rows in results.items():
        for form in ("fast", "integer", "compact"):
            ours = rows[form]
            print(f"{arch} {form:>7}: vs FP32 batch 1 {rows['fp32']['ms1'] / ours['ms1']:.2f}x, batch 32 "
                  f"{rows['fp32']['ms32'] / ours['ms32']:.2f}x; vs ONNX Runtime int8 batch 1 "
                  f"{rows['ort-int8']['ms1'] / ours['ms1']:.2f}x, batch 32 {rows['ort-int8']['ms32'] / ours['ms32']:.2f}x; "
                  f"size {ours['size_mb'] / rows['fp32']['size_mb']:.3f}x of FP32")


if __name__ == "__main__":
    main()
