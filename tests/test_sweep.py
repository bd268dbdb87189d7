"""The whole pipeline with its budget sweep on real Ray Tune + Ray Train + MLflow (CPU, tiny data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from orchestrator.config import PipelineConfig
from orchestrator.distributed.pipeline import run_pipeline
from orchestrator.distributed.sweep import FAIL_ONCE_ENV, format_report
from orchestrator.tracking import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    ray.shutdown()


def test_sweep_end_to_end_retries_reports_failures_and_skips_on_rerun(tmp_path: Path, digits_slice: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    cfg = PipelineConfig.model_validate({
        "name": "sweep", "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(digits_slice), "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
        "fp": {"epochs": 0},
        "indicators": {"bits": [4, 3, 2], "epochs": 1, "train_fraction": 1.0},
        "search": {"budgets": [{"target_wbits": 3, "target_abits": 3}, {"bitops_g": 0.001}]},
        "finetune": {"epochs": 1, "train_fraction": 1.0, "baselines": [3]},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "max_failures": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-sweep"},
    })
    marker = tmp_path / "failed-once"
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {FAIL_ONCE_ENV: f"W3A3:{marker}"}})

    rows = run_pipeline(cfg)

    assert marker.exists(), "the fault was not injected"
    by_budget = {row["budget"]: row for row in rows}
    assert set(by_budget) == {"W3A3", "G0.001", "uniform-W3A3"}
    assert by_budget["W3A3"]["status"] == "ok" and 0 <= by_budget["W3A3"]["top1"] <= 1  # retried, then succeeded
    assert by_budget["uniform-W3A3"]["status"] == "ok"
    assert by_budget["W3A3"]["bitops_g"] <= by_budget["uniform-W3A3"]["bitops_g"] * (1 + 1e-9)
    failed = by_budget["G0.001"]
    assert failed["status"] == "failed" and "below the minimum" in failed["error"]
    printed = capsys.readouterr().out
    assert "FAILED G0.001: BitOps budget 0.001 G is below the minimum" in printed

    tracker = Tracker.from_config(cfg)
    client = tracker.client
    [parent] = client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["limpq.failed_trials"] == "G0.001"
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.parquet", "report.txt", "plots"} <= parent_artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/pareto.png", "plots/bits"}
    bit_charts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots/bits")}
    assert bit_charts == {"plots/bits/W3A3.png", "plots/bits/uniform-W3A3.png"}
    trials = {run.info.run_name: run for run in
              client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'trial'")}
    assert set(trials) == {"W3A3", "G0.001", "uniform-W3A3"}
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in trials.values())
    assert trials["W3A3"].info.status == "FINISHED" and trials["W3A3"].data.tags["limpq.attempts"] == "2"
    assert trials["G0.001"].info.status == "FAILED"
    assert "below the minimum" in trials["G0.001"].data.tags["limpq.error"]
    trial_artifacts = {a.path for a in client.list_artifacts(trials["W3A3"].info.run_id, "checkpoint")}
    assert trial_artifacts == {"checkpoint/finetuned.pt", "checkpoint/export.pt"}
    assert "val_top1" in trials["W3A3"].data.metrics and "bitops_g" in trials["W3A3"].data.metrics
    run_count = len(client.search_runs([tracker.experiment_id], ""))

    again = run_pipeline(cfg)  # everything finished: every stage is skipped, nothing new in MLflow

    assert format_report(again) == format_report(rows)
    assert len(client.search_runs([tracker.experiment_id], "")) == run_count
