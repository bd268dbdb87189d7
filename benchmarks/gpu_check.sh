#!/usr/bin/env bash
# The GPU check, for any machine with NVIDIA GPUs (a few minutes on one GPU, under 8):
#   1. Ray Train on CUDA with the NCCL backend: a TorchTrainer over every GPU does an all-reduce and a
#      DDP step, and each worker reports its device;
#   2. bf16: autocast forward/backward of ResNet18 runs and its step time against fp32;
#   3. the joint indicator step (one FP pass + one per candidate bit-width, SPEC 1.3) of ResNet18 at
#      224x224 on synthetic tensors against (|B|+1) plain FP steps of the same model and batch.
# Ratios are printed last. Without a GPU it says so and exits 0.
#
#   benchmarks/gpu_check.sh [BATCH]          # BATCH: images per step (64)
# Settings: LIMPQ_GPU_CHECK_STEPS timed steps per measurement (10), PYTHON (the venv's python).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
BATCH="${1:-64}"
STEPS="${LIMPQ_GPU_CHECK_STEPS:-10}"

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
timeout 450 "$PYTHON" - "$BATCH" "$STEPS" <<'EOF'
import sys
import tempfile
import time

import torch

batch, steps = int(sys.argv[1]), int(sys.argv[2])
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
from orchestrator.modelinfo import build_model
from orchestrator.train.stages import joint_model, joint_training, plain_training

device = torch.device("cuda", 0)
images = torch.randn(batch, 3, 224, 224, device=device)
labels = torch.randint(0, 1000, (batch,), device=device)


def seconds_per_step(step) -> float:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step(images, labels)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def config(bf16: bool) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "model": {"arch": "resnet18", "num_classes": 1000, "input_size": 224},
        "data": {"demo": True}, "ray": {"bf16": bf16, "use_gpu": True},
    })


for bf16 in (False, True):
    cfg = config(bf16)
    torch.manual_seed(0)
    fp = build_model("resnet18", 1000).to(device)
    fp_step = seconds_per_step(plain_training(fp, cfg.fp, 1000, cfg.ray.bf16).step)
    joint = joint_model(cfg.model, cfg.indicators.bits, build_model("resnet18", 1000)).to(device)
    joint_step = seconds_per_step(joint_training(joint, cfg.indicators, 1000, cfg.seed, cfg.ray.bf16).step)
    bits = len(cfg.indicators.bits)
    results[bf16] = (fp_step, joint_step, bits)
    name = "bf16" if bf16 else "fp32"
    print(f"[2/3] {name}: FP step {1000 * fp_step:.1f} ms, joint step {1000 * joint_step:.1f} ms "
          f"(|B| = {bits}: {cfg.indicators.bits}), batch {batch}, {torch.cuda.get_device_name(device)}")
if not torch.cuda.is_bf16_supported():
    print("[2] note: this GPU has no native bf16; autocast emulates it")

print("ratios:")
fp32_fp, fp32_joint, bits = results[False]
bf16_fp, bf16_joint, _ = results[True]
print(f"  joint step / ((|B|+1) x FP step), fp32: {fp32_joint / ((bits + 1) * fp32_fp):.2f}x")
print(f"  joint step / ((|B|+1) x FP step), bf16: {bf16_joint / ((bits + 1) * bf16_fp):.2f}x")
print(f"  bf16 / fp32 FP step time: {bf16_fp / fp32_fp:.2f}x")
EOF
