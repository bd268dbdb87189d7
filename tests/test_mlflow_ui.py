"""The MLflow UI in headless Chromium (Playwright) over real stores: `mlflow server` on 127.0.0.1,
pages checked by the text they render (see mlflow_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_browser import (
    Expectations,
    check_pages,
    expectations_from_store,
    find_chromium,
    mlflow_server,
)
from pipelines import Sweep

from orchestrator.tracking.ui import (
    EXPERIMENT_KIND_TAG,
    MODEL_DEVELOPMENT,
    mark_model_development,
)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("chromium is not installed and cannot be here (needs root and apt-get: apt-get install chromium)")
    return found


def _write_store(tracking_uri: str, artifacts: Path) -> None:
    """What a pipeline leaves, written with the client: a root run, stage runs under it, two trials
    under the sweep with metrics and artifacts, and a registered model with a version per trial."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("ui-check", artifact_location=artifacts.as_uri())
    mark_model_development(client, experiment_id)
    root = client.create_run(experiment_id, run_name="pipeline-1a2b3c")
    children = {"mlflow.parentRunId": root.info.run_id}
    for stage in ("fp", "indicators"):
        client.set_terminated(client.create_run(experiment_id, run_name=stage, tags=children).info.run_id)
    sweep = client.create_run(experiment_id, run_name="sweep", tags=children)
    client.create_registered_model("pipeline-resnet18")
    for budget, top1 in (("W3A3", 0.61), ("W4A4", 0.72)):
        trial = client.create_run(experiment_id, run_name=budget, tags={"mlflow.parentRunId": sweep.info.run_id})
        for epoch in range(2):
            client.log_metric(trial.info.run_id, "val_top1", top1 - 0.1 * (1 - epoch), step=epoch + 1)
        client.log_metric(trial.info.run_id, "size_mb", 1.25)
        client.log_text(trial.info.run_id, '{"layers": []}', "policy.json")
        client.log_text(trial.info.run_id, "artifact_path: model\n", "model/MLmodel")
        client.create_model_version("pipeline-resnet18", f"{trial.info.artifact_uri}/model", run_id=trial.info.run_id)
        client.set_terminated(trial.info.run_id)
    client.set_terminated(sweep.info.run_id)
    client.set_terminated(root.info.run_id)


def test_experiment_is_tagged_as_model_training(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("tagged", artifact_location=(tmp_path / "artifacts").as_uri())
    mark_model_development(client, experiment_id)
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT


@pytest.mark.slow
def test_ui_shows_run_tree_registered_versions_and_a_trial(tmp_path: Path, chromium: str) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _write_store(tracking_uri, tmp_path / "artifacts")

    with mlflow_server(tracking_uri, tmp_path / "mlflow-server.log") as url:
        check_pages(url, tracking_uri, "ui-check", Expectations(
            root_run="pipeline-1a2b3c", nested_runs=["fp", "indicators", "sweep", "W3A3", "W4A4"],
            registered_model="pipeline-resnet18", model_versions=2, trial_run="W4A4",
            trial_metrics=["val_top1", "0.72", "size_mb"], trial_artifacts=["policy.json", "model"],
        ), chromium)
        # the same check notices what is not there
        with pytest.raises(AssertionError, match="Version 3"):
            check_pages(url, tracking_uri, "ui-check", Expectations(
                root_run="pipeline-1a2b3c", registered_model="pipeline-resnet18", model_versions=3), chromium,
                timeout=30)


@pytest.mark.timeout(3000)  # in CI: the browser test (its set-up may be the session's sweep)
def test_ui_over_a_pipeline_store(tmp_path: Path, sweep: Sweep, chromium: str) -> None:
    """What a real pipeline wrote (the session's sweep: its run tree, registered versions, a trial's
    metrics and artifacts) is what the UI shows; the local Ray it started had its dashboard up on
    127.0.0.1, and Ray's driver-side chatter went to the run's log file."""
    assert sweep.dashboard is not None and sweep.dashboard.startswith("http://127.0.0.1:")
    assert sweep.dashboard_status == 200
    assert "Started a local Ray instance" in (sweep.tmp_path / "runs" / "sweep" / "logs" / "limpq.log").read_text()
    tracking_uri = sweep.cfg.mlflow.tracking_uri
    expected = expectations_from_store(tracking_uri, "test-sweep")
    assert expected.trial_run in {"W3A3", "G0.1", "uniform-W3A3"} and "val_top1" in expected.trial_metrics

    with mlflow_server(tracking_uri, tmp_path / "mlflow-server.log") as url:
        check_pages(url, tracking_uri, "test-sweep", expected, chromium)
