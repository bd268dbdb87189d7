"""How far the fast ONNX form (docs/method.md §12) is from registered PyTorch models, and why: for each model,
top-1 agreement on the config's val split between ONNX Runtime running `export_onnx(form="fast")` and

- the registered PyTorch model;
- the same model with BatchNorm's beta moved onto the file's INT32 bias grid;
- that, with the export-added 8-bit output quantizers put in after their BatchNorms (what the file computes).

torchvision ResNets only (the added quantizers are mapped to their BatchNorms by name: convN -> bnN,
downsample.0 -> downsample.1).

    PYTHONPATH=. .venv/bin/python benchmarks/fast_agreement.py --config jobs/configs/smoke.yaml \\
        --tracking-uri sqlite:///mlflow.db --model models:/smoke-resnet18@best-top1 [--model ...] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from orchestrator.config.loading import load_config
from orchestrator.data.layout import index_dataset
from orchestrator.quant.onnx_check import compare_with_torch
from orchestrator.quant.onnx_export import export_onnx, quantized_from_metadata
from orchestrator.tracking.onnx_models import val_batches


def batchnorm_of(conv: str) -> str:
    if conv.endswith("downsample.0"):
        return conv[:-1] + "1"
    head, _, name = conv.rpartition(".")
    return f"{head}.bn{name.removeprefix('conv')}" if head else f"bn{name.removeprefix('conv')}"


def _active(norm: torch.nn.Module) -> torch.nn.Module:
    return norm.copies[str(norm.active_bits)] if hasattr(norm, "copies") else norm


def on_bias_grid(model: torch.nn.Module, proto: onnx.ModelProto) -> torch.nn.Module:
    """`model` with each folded BatchNorm's beta moved so that the folded bias is the file's INT32 bias."""
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    moved = copy.deepcopy(model)
    for name in initializers:
        if name.endswith(".folded_bias_codes"):
            conv = name.removesuffix(".folded_bias_codes")
            bias = torch.tensor(initializers[name].astype(np.float64)
                                * initializers[f"{conv}.folded_bias_scale"].astype(np.float64))
            norm = _active(moved.get_submodule(batchnorm_of(conv)))
            with torch.no_grad():
                factor = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
                norm.bias.copy_((bias + factor * norm.running_mean.double()).float())
    return moved


def with_added_outputs(model: torch.nn.Module, proto: onnx.ModelProto) -> torch.nn.Module:
    for quantizer in quantized_from_metadata(proto):
        if quantizer.kind == "output":
            model.get_submodule(batchnorm_of(quantizer.layer)).register_forward_hook(
                lambda module, inputs, out, step=quantizer.scale: (out / step).round().clamp(-128, 127) * step)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", action="append", required=True, help="a registered PyTorch model's URI")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = load_config(args.config, overrides).with_absolute_paths()
    batches = list(val_batches(cfg, index_dataset(cfg.data)))
    mlflow.set_tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        for uri in args.model:
            model = mlflow.pytorch.load_model(uri, map_location="cpu").eval()
            path = Path(directory) / "fast.onnx"
            export_onnx(model, torch.zeros(1, *batches[0][0].shape[1:]), path, form="fast")
            proto = onnx.load(path)
            gridded = on_bias_grid(model, proto)
            print(uri)
            print("  registered model:                ", compare_with_torch(model, path, batches).summary())
            print("  beta on the bias grid:           ", compare_with_torch(gridded, path, batches).summary())
            print("  and the added output quantizers: ",
                  compare_with_torch(with_added_outputs(gridded, proto), path, batches).summary(), flush=True)


if __name__ == "__main__":
    main()
