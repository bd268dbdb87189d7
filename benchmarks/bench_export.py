"""ONNX Runtime (CPU) latency and file size of a mixed-precision QDQ export vs the FP32 export of the
same model, in one process; ratios printed last. Also: the operators ONNX Runtime actually runs for
each file (its optimized graph), and the QDQ file in a session with `session.disable_quant_qdq=1`,
which lets ONNX Runtime dequantize the constant weights once at load and fuse BatchNorm into the
convolutions (activations stay quantized).

The model is either a registered/logged PyTorch model (`--model-uri`, e.g. the demo's
models:/demo-resnet18@best-top1 after `make demo`) or, by default, torchvision resnet18 at 224x224
(10 classes) quantized at a seeded random mixed policy (weights 2-4 bits, activations 3-4 bits, the
fixed first conv and classifier at 8 bits) with step sizes set on random images: latency and size
depend on the graph and the bit-widths, not on trained values.

    .venv/bin/python benchmarks/bench_export.py [--model-uri URI [--tracking-uri URI]] [--input-size 224]
        [--threads 0] [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from orchestrator.models.info import build_model, split_layers, trace_layers
from orchestrator.quant.onnx_check import cpu_session
from orchestrator.quant.onnx_export import INPUT_NAME, export_onnx, float_copy
from orchestrator.quant.surgery import quantize_model

MEGABYTE = 2**20


def random_mixed_model(input_size: int, seed: int = 0) -> torch.nn.Module:
    model = build_model("resnet18", 10)
    searchable, _ = split_layers(trace_layers(model, input_size), None)
    rng = random.Random(seed)
    quantize_model(model, policy={layer.name: (rng.choice([2, 3, 4]), rng.choice([3, 4])) for layer in searchable},
                   input_size=input_size)
    model.train()
    with torch.no_grad():  # step sizes (and BN statistics) from random images, as a first training batch sets them
        model(torch.randn(8, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def registered_model(model_uri: str, tracking_uri: str | None) -> tuple[torch.nn.Module, int]:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import get_model_info

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    size = get_model_info(model_uri).signature.inputs.inputs[0].shape[-1]
    return mlflow.pytorch.load_model(model_uri, map_location="cpu").eval(), size


def session(path: Path, threads: int, weights_at_load: bool = False,
            optimized: Path | None = None) -> onnxruntime.InferenceSession:
    if not (weights_at_load or optimized):
        return cpu_session(path, threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    if weights_at_load:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # it warns that an optimized CPU graph is specific to this machine
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runtime_ops(path: Path, threads: int, weights_at_load: bool = False) -> str:
    """The operators of ONNX Runtime's optimized graph for `path`, most frequent first."""
    optimized = path.with_suffix(".optimized.onnx")
    session(path, threads, weights_at_load, optimized)
    counts = Counter(node.op_type for node in onnx.load(optimized).graph.node)
    return ", ".join(f"{op} x{n}" for op, n in counts.most_common())


def median_ms(runner: onnxruntime.InferenceSession, images: np.ndarray, repeats: int) -> float:
    for _ in range(3):  # warm-up: first runs allocate and pick kernels
        runner.run(None, {INPUT_NAME: images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(None, {INPUT_NAME: images})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="a logged PyTorch model (default: a random mixed-precision resnet18)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for --model-uri (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--input-size", type=int, default=224, help="input size of the default model")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its choice)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (median reported)")
    args = parser.parse_args()

    if args.model_uri:
        model, size = registered_model(args.model_uri, args.tracking_uri)
        what = args.model_uri
    else:
        model, size = random_mixed_model(args.input_size), args.input_size
        what = f"resnet18 @{size}x{size}, random mixed policy (W2-4 A3-4, fixed layers W8A8)"
    example = torch.zeros(1, 3, size, size)
    with tempfile.TemporaryDirectory() as directory:
        qdq = export_onnx(model, example, Path(directory) / "qdq.onnx")
        fp32 = export_onnx(float_copy(model), example, Path(directory) / "fp32.onnx")
        sessions = {"qdq": session(qdq.path, args.threads), "fp32": session(fp32.path, args.threads),
                    "qdq-weights-at-load": session(qdq.path, args.threads, weights_at_load=True)}
        weights = [q for q in qdq.quantized if q.kind == "weight"]
        print(f"model: {what}")
        print(f"quantized weights: {sum(q.onnx_type == 'INT4' for q in weights)} INT4, "
              f"{sum(q.onnx_type == 'INT8' for q in weights)} INT8; ONNX Runtime {onnxruntime.__version__}, "
              f"CPU threads {args.threads or 'default'}")
        print(f"file size: QDQ {qdq.size_bytes / MEGABYTE:.2f} MB, FP32 {fp32.size_bytes / MEGABYTE:.2f} MB")
        print(f"ONNX Runtime runs QDQ as: {runtime_ops(qdq.path, args.threads)}")
        print(f"  with session.disable_quant_qdq=1: {runtime_ops(qdq.path, args.threads, weights_at_load=True)}")
        print(f"ONNX Runtime runs FP32 as: {runtime_ops(fp32.path, args.threads)}")
        ratios, load_ratios = {}, {}
        for batch in (1, 32):
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).numpy()
            with torch.no_grad():
                expected = model(torch.from_numpy(images)).numpy()
            differences = {name: float(np.abs(runner.run(None, {INPUT_NAME: images})[0] - expected).max())
                           for name, runner in sessions.items() if name != "fp32"}
            times = {name: median_ms(runner, images, args.repeats) for name, runner in sessions.items()}
            ratios[batch] = times["qdq"] / times["fp32"]
            load_ratios[batch] = times["qdq-weights-at-load"] / times["fp32"]
            print(f"batch {batch:>2} (median of {args.repeats}): QDQ {times['qdq']:.1f} ms, QDQ with "
                  f"session.disable_quant_qdq=1 {times['qdq-weights-at-load']:.1f} ms, FP32 {times['fp32']:.1f} ms; "
                  f"largest logit difference to PyTorch: QDQ {differences['qdq']:.3g}, with "
                  f"session.disable_quant_qdq=1 {differences['qdq-weights-at-load']:.3g}")
        print(f"size ratio FP32 / QDQ: {fp32.size_bytes / qdq.size_bytes:.2f}x")
        print(f"latency ratio QDQ / FP32 with session.disable_quant_qdq=1: batch 1 {load_ratios[1]:.2f}x, "
              f"batch 32 {load_ratios[32]:.2f}x")
        print(f"latency ratio QDQ / FP32 (above 1: QDQ slower): batch 1 {ratios[1]:.2f}x, batch 32 {ratios[32]:.2f}x")


if __name__ == "__main__":
    main()
