"""Layer 1 (the method) imports without Ray or MLflow; the search CLI path does not import torch."""

from __future__ import annotations

import subprocess
import sys

LAYER_ONE = [
    "orchestrator.config", "orchestrator.modelinfo", "orchestrator.indicators", "orchestrator.plots",
    "orchestrator.quant.lsq", "orchestrator.quant.modules", "orchestrator.quant.surgery", "orchestrator.quant.policy",
    "orchestrator.quant.onnx_export", "orchestrator.quant.onnx_check", "orchestrator.search.costs",
    "orchestrator.search.ilp", "orchestrator.search.policy", "orchestrator.search.sweep", "orchestrator.train.stages",
    "orchestrator.train.steps",
    "orchestrator.data.demo", "orchestrator.data.local", "orchestrator.data.convert", "orchestrator.data.layout",
    "orchestrator.data.storage",
]


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_method_layer_imports_without_ray_or_mlflow() -> None:
    loaded = _loaded_after("\n".join(f"import {module}" for module in LAYER_ONE))
    assert "ray" not in loaded and "mlflow" not in loaded


def test_dataset_checks_do_not_import_torch() -> None:
    """The preflight checks run before every entry point: listing and footers only."""
    loaded = _loaded_after("import orchestrator.data.layout, orchestrator.data.storage")
    assert not {"torch", "ray", "mlflow"} & loaded


def test_search_with_a_cached_cost_table_does_not_import_torch() -> None:
    loaded = _loaded_after("import orchestrator.cli.search, orchestrator.search.ilp, orchestrator.search.costs, "
                           "orchestrator.indicators")
    assert "torch" not in loaded
