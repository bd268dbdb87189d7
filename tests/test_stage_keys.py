"""Stage keys follow what a stage reads (settings and input contents), never where it lives."""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.config import PipelineConfig
from orchestrator.modelinfo import build_model
from orchestrator.stagekeys import stage_keys
from orchestrator.train.checkpoint import save_checkpoint


def _config(data: Path, **sections) -> PipelineConfig:
    raw = {"model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
           "data": {"path": str(data), "batch_size": 16}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return PipelineConfig.model_validate(raw)


def test_keys_ignore_location_and_resources_but_follow_settings(digits_slice: Path, tmp_path: Path) -> None:
    base = stage_keys(_config(digits_slice))
    moved = tmp_path / "upload-copy"  # as under `ray job submit --working-dir .`: same files, other root
    shutil.copytree(digits_slice, moved)
    assert stage_keys(_config(moved)) == base
    assert stage_keys(_config(digits_slice, ray={"num_workers": 3, "address": "auto"},
                              mlflow={"experiment": "other"})) == base
    later = stage_keys(_config(digits_slice, finetune={"epochs": 5}))
    assert (later.fp, later.indicators) == (base.fp, base.indicators) and later.sweep != base.sweep
    changed = stage_keys(_config(digits_slice, indicators={"epochs": 1}))
    assert changed.fp == base.fp and changed.indicators != base.indicators and changed.sweep != base.sweep


def test_keys_follow_file_contents(digits_slice: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_slice, data)
    before = stage_keys(_config(data))
    image = next((data / "train" / "3").iterdir())
    image.write_bytes(image.read_bytes() + b"\0" * 7)  # an image replaced in place
    after = stage_keys(_config(data))
    assert after.fp != before.fp and after.indicators != before.indicators

    checkpoint = tmp_path / "fp.pt"
    save_checkpoint(checkpoint, build_model("resnet18", 10))
    from_file = stage_keys(_config(data, fp={"source": "checkpoint", "checkpoint": str(checkpoint)}))
    save_checkpoint(checkpoint, build_model("resnet18", 10))  # new random weights, same path
    replaced = stage_keys(_config(data, fp={"source": "checkpoint", "checkpoint": str(checkpoint)}))
    assert replaced.fp != from_file.fp and replaced.indicators != from_file.indicators
