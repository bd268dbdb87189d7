"""Tiny pipeline configs for the end-to-end tests: resnet18 at 16x16 on the digits slice (80 train,
40 val images), with everything it writes (outputs, Ray storage, an sqlite MLflow store) under the
test's directory. Each test states only what it changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

from orchestrator.config.schema import PipelineConfig


def tiny_raw(tmp_path: Path, data: Path | str, name: str = "tiny", **sections: Any) -> dict[str, Any]:
    """The raw config; each keyword is a section whose keys replace the defaults' (a non-dict value
    replaces the whole entry)."""
    raw: dict[str, Any] = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(data), "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
        "fp": {"epochs": 0},
        "indicators": {"bits": [4, 2], "epochs": 1, "train_fraction": 1.0},
        "search": {"budgets": []},
        "finetune": {"epochs": 0, "baselines": []},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def tiny_config(tmp_path: Path, data: Path | str, name: str = "tiny", **sections: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(tiny_raw(tmp_path, data, name, **sections))


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def write_smoke_config(data: Path, tmp: Path, **sections: dict[str, Any]) -> Path:
    """jobs/configs/smoke.yaml on `data` (batch 16: a step per epoch on the digits slice) with its runs,
    Ray storage and MLflow store under `tmp`, each of `sections` updated with the keys given; returns
    the file."""
    raw = yaml.safe_load((REPO / "jobs/configs/smoke.yaml").read_text())
    raw["data"].update(path=str(data), demo=False, batch_size=16)
    raw["output_dir"] = str(tmp / "runs")
    raw["ray"]["storage_path"] = str(tmp / "ray")
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    for section, keys in sections.items():
        raw[section].update(keys)
    return write_config(tmp / "smoke.yaml", raw)
