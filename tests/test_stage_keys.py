"""Stage keys follow what a stage reads (settings and input contents), never where it lives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import index_dataset
from orchestrator.models.info import build_model
from orchestrator.checks.stage_keys import StageKeys, stage_keys
from orchestrator.train.checkpoint import save_checkpoint


def _config(data: Path, **sections) -> PipelineConfig:
    raw = {"model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
           "data": {"path": str(data), "batch_size": 16}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return PipelineConfig.model_validate(raw)


def keys(cfg: PipelineConfig) -> StageKeys:
    return stage_keys(cfg, index_dataset(cfg.data).fingerprint)


def test_keys_ignore_location_and_resources_but_follow_settings(digits_slice: Path, tmp_path: Path) -> None:
    base = keys(_config(digits_slice))
    moved = tmp_path / "upload-copy"  # as under `ray job submit --working-dir .`: same files, other root
    shutil.copytree(digits_slice, moved)
    assert keys(_config(moved)) == base
    assert keys(_config(digits_slice, ray={"num_workers": 3, "address": "auto"},
                              mlflow={"experiment": "other"})) == base
    later = keys(_config(digits_slice, finetune={"epochs": 5}))
    assert (later.fp, later.indicators) == (base.fp, base.indicators) and later.sweep != base.sweep
    changed = keys(_config(digits_slice, indicators={"epochs": 1}))
    assert changed.fp == base.fp and changed.indicators != base.indicators and changed.sweep != base.sweep


def test_keys_follow_file_contents(digits_slice: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_slice, data)
    before = keys(_config(data))
    image = next((data / "train" / "3").iterdir())
    image.write_bytes(image.read_bytes() + b"\0" * 7)  # an image replaced in place
    after = keys(_config(data))
    assert after.fp != before.fp and after.indicators != before.indicators

    checkpoint = tmp_path / "fp.pt"
    save_checkpoint(checkpoint, build_model("resnet18", 10))
    from_file = keys(_config(data, fp={"source": "checkpoint", "checkpoint": str(checkpoint)}))
    save_checkpoint(checkpoint, build_model("resnet18", 10))  # new random weights, same path
    replaced = keys(_config(data, fp={"source": "checkpoint", "checkpoint": str(checkpoint)}))
    assert replaced.fp != from_file.fp and replaced.indicators != from_file.indicators


@pytest.mark.slow
def test_one_name_three_configs_each_sweep_searches_its_own_indicators(tmp_path: Path, digits_slice: Path) -> None:
    """The demo, then `--set indicators.epochs=2`, then a later-stage change: the third sweep reuses the
    FIRST config's indicators (same key), never the files the second left in runs/<name>/."""
    import json

    import ray

    from orchestrator.distributed.run import run_pipeline
    from orchestrator.search.indicators import load_indicators
    from orchestrator.checks.preflight import preflight
    from orchestrator.search.ilp import Searcher
    from orchestrator.tracking.runs import Tracker

    def config(**sections) -> PipelineConfig:
        raw = {
            "name": "shared-name", "output_dir": str(tmp_path / "runs"),
            "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
            "data": {"path": str(digits_slice), "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
            "fp": {"epochs": 0},
            "indicators": {"bits": [4, 3, 2], "epochs": 1, "train_fraction": 1.0},
            "search": {"budgets": [{"target_wbits": 3, "target_abits": 3}]},
            "finetune": {"epochs": 0},
            "ray": {"storage_path": str(tmp_path / "ray")},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "one-name"},
        }
        for section, values in sections.items():
            raw[section].update(values)
        return PipelineConfig.model_validate(raw)

    first, second, third = config(), config(indicators={"epochs": 2}), config(search={"alpha": 0.5})
    try:
        checked = [preflight(cfg) for cfg in (first, second, third)]
        for each in checked:
            run_pipeline(each)
    finally:
        ray.shutdown()

    tracker = Tracker.from_config(first)
    client = tracker.client
    indicator_runs = {run.data.tags["limpq.stage_key"]: run.info.run_id for run in client.search_runs(
        [tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")}
    assert len(indicator_runs) == 2
    sweeps = client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'sweep'",
                                order_by=["attributes.start_time ASC"])
    assert len(sweeps) == 3
    for each, sweep in zip(checked, sweeps):
        cfg = each.config
        expected_run = indicator_runs[keys(cfg).indicators]
        assert sweep.data.tags["limpq.indicators_run_id"] == expected_run
        indicators = load_indicators(tracker.download_artifact(expected_run, "indicators.json", tmp_path / expected_run))
        [trial] = tracker.child_runs(sweep.info.run_id)
        policy = json.loads(tracker.download_artifact(trial.info.run_id, "policy.json", tmp_path / trial.info.run_id)
                            .read_text())
        expected = Searcher(indicators, each.costs, alpha=cfg.search.alpha).solve(cfg.search.budgets[0])
        assert [(la["wbits"], la["abits"]) for la in policy["layers"]] == \
            [(la.wbits, la.abits) for la in expected.layers]


def test_scores_option_keys_only_the_sweep_and_only_when_hessian(digits_slice: Path) -> None:
    """Configs without `search.scores` keep their keys (the hessian settings do not count while unused);
    hessian scores share the FP and indicator stages with the limpq config they are compared with."""
    base = keys(_config(digits_slice))
    assert keys(_config(digits_slice, search={"scores": "limpq", "hessian_batches": 9})) == base
    hessian = keys(_config(digits_slice, search={"scores": "hessian"}))
    assert (hessian.fp, hessian.indicators) == (base.fp, base.indicators) and hessian.sweep != base.sweep
    assert keys(_config(digits_slice, search={"scores": "hessian", "hessian_samples": 8})).sweep != hessian.sweep
