#!/usr/bin/env bash
# The GPU check, for any machine with NVIDIA GPUs (a few minutes on one GPU, under 12):
#   1. Ray Train on CUDA with the NCCL backend: a TorchTrainer over every GPU does an all-reduce and a
#      DDP step, and each worker reports its device;
#   2. bf16: autocast forward/backward of ResNet18 runs and its step time against fp32;
#   3. the joint indicator step (one FP pass + one per candidate bit-width, docs/method.md §3) of ResNet18 at
#      224x224 on synthetic tensors against (|B|+1) plain FP steps of the same model and batch,
#      eager (fp32, bf16), eager in channels_last (bf16), and compiled (training.compile: on, bf16), with
#      each compilation's seconds;
#   4. a W4A4 quantized conv forward+backward against the plain conv, eager and compiled (bf16).
# Ratios are printed last. Without a GPU it says so and exits 0.
#
#   benchmarks/gpu_check.sh [BATCH]          # BATCH: images per step (64)
# Settings: LIMPQ_GPU_CHECK_STEPS timed steps per measurement (10), LIMPQ_GPU_CHECK_COMPILE=0 skips
# the compiled cases, PYTHON (the venv's python).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
BATCH="${1:-64}"
STEPS="${LIMPQ_GPU_CHECK_STEPS:-10}"
COMPILE="${LIMPQ_GPU_CHECK_COMPILE:-1}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU present (nvidia-smi finds none); nothing to check"
    exit 0
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no GPU present to torch (torch.cuda.is_available() is False: CPU-only torch build or driver mismatch); nothing to check"
    nvidia-smi -L
    exit 0
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 690 "$PYTHON" - "$BATCH" "$STEPS" "$COMPILE" <<'EOF'
import sys
import tempfile
import time

import torch

batch, steps, compile_too = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] != "0"
results = {}

# ---------------------------------------------------------------- 1. Ray Train, CUDA + NCCL
import ray
import ray.train
import ray.train.torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def nccl_worker(_config):
    import torch.distributed as dist

    device = ray.train.torch.get_device()
    value = torch.ones(1, device=device) * (ray.train.get_context().get_world_rank() + 1)
    dist.all_reduce(value)
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 2))
    loss = model(torch.randn(4, 8, device=device)).sum()
    loss.backward()
    ray.train.report({"all_reduce": value.item(), "device": str(device), "backend": dist.get_backend()})


gpus = torch.cuda.device_count()
ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
started = time.perf_counter()
result = TorchTrainer(
    nccl_worker, scaling_config=ScalingConfig(num_workers=gpus, use_gpu=True),
    torch_config=TorchConfig(backend="nccl"),
    run_config=RunConfig(name="gpu-check", storage_path=tempfile.mkdtemp(prefix="gpu-check-")),
).fit()
expected = gpus * (gpus + 1) / 2
assert result.metrics["all_reduce"] == expected, result.metrics
assert result.metrics["backend"] == "nccl" and result.metrics["device"].startswith("cuda"), result.metrics
print(f"[1] Ray Train on {gpus} GPU(s), NCCL: all-reduce {result.metrics['all_reduce']:.0f} (expected {expected:.0f}), "
      f"DDP step on {result.metrics['device']}, {time.perf_counter() - started:.1f} s")
ray.shutdown()

# ---------------------------------------------------------------- 2 and 3: one GPU, ResNet18 224x224
from orchestrator.config.schema import PipelineConfig
from orchestrator.models.info import build_model
from orchestrator.quant.modules import QConv2d
from orchestrator.train.stages import joint_model, joint_training, plain_training

device = torch.device("cuda", 0)
images = torch.randn(batch, 3, 224, 224, device=device)
labels = torch.randint(0, 1000, (batch,), device=device)


def seconds_per_step(step, inputs=images) -> float:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator; compiled: the first steps compile
        step(inputs, labels)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(inputs, labels)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def config(bf16: bool, compile_mode: str = "off") -> PipelineConfig:
    return PipelineConfig.model_validate({
        "model": {"arch": "resnet18", "num_classes": 1000, "input_size": 224},
        "data": {"demo": True}, "training": {"bf16": bf16, "compile": compile_mode}, "ray": {"use_gpu": True},
    })


variants = [("fp32", False, "off", False), ("bf16", True, "off", False), ("bf16 channels_last", True, "off", True)]
if compile_too:
    variants.append(("bf16 compiled", True, "on", False))
for name, bf16, compile_mode, channels_last in variants:
    cfg = config(bf16, compile_mode)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    inputs = images.contiguous(memory_format=layout)
    torch.manual_seed(0)
    fp = build_model("resnet18", 1000).to(device, memory_format=layout)
    fp_run = plain_training(fp, cfg.fp, 1000, cfg.training.bf16, cfg.training.compile)
    fp_step = seconds_per_step(fp_run.step, inputs)
    joint = joint_model(cfg.model, cfg.indicators.bits, build_model("resnet18", 1000)).to(device, memory_format=layout)
    joint_run = joint_training(joint, cfg.indicators, 1000, cfg.seed, cfg.training.bf16, cfg.training.compile)
    joint_step = seconds_per_step(joint_run.step, inputs)
    bits = len(cfg.indicators.bits)
    results[name] = (fp_step, joint_step, bits)
    compiled = ""
    if joint_run.compiled is not None:
        compiled = (f"; compile {fp_run.compiled.compile_seconds:.0f} s (FP), "
                    f"{joint_run.compiled.compile_seconds:.0f} s (joint, one graph for "
                    f"{joint_run.compiled.calls} compiled passes)")
    print(f"[2/3] {name}: FP step {1000 * fp_step:.1f} ms, joint step {1000 * joint_step:.1f} ms "
          f"(|B| = {bits}: {cfg.indicators.bits}), batch {batch}, {torch.cuda.get_device_name(device)}{compiled}")
if not torch.cuda.is_bf16_supported():
    print("[2] note: this GPU has no native bf16; autocast emulates it")

# ---------------------------------------------------------------- 4. quantized vs plain conv, bf16
conv_rows = []
for channels, size in ((64, 56), (256, 14)):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(batch, channels, size, size, device=device))
    plain = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    quant = QConv2d.from_float(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device), [4], [4])
    quant(x)  # lazy step-size init, eager as in training

    def conv_step(layer):
        def run(inputs, _labels):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(inputs.clone().requires_grad_())
            out.float().sum().backward()
        return run

    row = [seconds_per_step(conv_step(plain), x), seconds_per_step(conv_step(quant), x)]
    if compile_too:
        row += [seconds_per_step(conv_step(torch.compile(layer, dynamic=False)), x) for layer in (plain, quant)]
    conv_rows.append((f"{channels}->{channels} @{size}x{size} b{batch}", row))
    print(f"[4] conv {conv_rows[-1][0]} bf16: plain {1000 * row[0]:.2f} ms, W4A4 {1000 * row[1]:.2f} ms" +
          (f"; compiled: plain {1000 * row[2]:.2f} ms, W4A4 {1000 * row[3]:.2f} ms" if compile_too else ""))

print("ratios:")
for name, (fp_step, joint_step, bits) in results.items():
    print(f"  (c) joint step / ((|B|+1) x FP step), {name}: {joint_step / ((bits + 1) * fp_step):.2f}x (goal <= 1.2x)")
if compile_too:
    fp_step, joint_step, bits = results["bf16 compiled"]
    print(f"  (c) compiled joint step / ((|B|+1) x eager FP step), bf16: "
          f"{joint_step / ((bits + 1) * results['bf16'][0]):.2f}x")
    print(f"  compiled / eager joint step, bf16: {joint_step / results['bf16'][1]:.2f}x")
print(f"  channels_last / contiguous, bf16 eager: FP step {results['bf16 channels_last'][0] / results['bf16'][0]:.2f}x, "
      f"joint step {results['bf16 channels_last'][1] / results['bf16'][1]:.2f}x")
for name, row in conv_rows:
    print(f"  (a) quantized/plain conv fwd+bwd {name}, bf16 eager: {row[1] / row[0]:.2f}x (goal <= 1.1x)")
    if compile_too:
        print(f"  (a) quantized/plain conv fwd+bwd {name}, bf16 compiled: {row[3] / row[2]:.2f}x (goal <= 1.1x)")
print(f"  bf16 / fp32 FP step time: {results['bf16'][0] / results['fp32'][0]:.2f}x")
EOF
