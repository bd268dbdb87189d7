"""jobs/configs/smoke.yaml made to run on a test's data and write under a test's directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_smoke_config(data: Path, tmp: Path, **sections: dict[str, Any]) -> Path:
    """smoke.yaml on `data` (batch 16: a step per epoch on the digits slice) with its runs, Ray storage
    and MLflow store under `tmp`, each of `sections` updated with the keys given; returns the file."""
    raw = yaml.safe_load((REPO / "jobs/configs/smoke.yaml").read_text())
    raw["data"].update(path=str(data), demo=False, batch_size=16)
    raw["output_dir"] = str(tmp / "runs")
    raw["ray"]["storage_path"] = str(tmp / "ray")
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    for section, keys in sections.items():
        raw[section].update(keys)
    config = tmp / "smoke.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config
