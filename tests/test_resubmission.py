"""Faults injected into real `limpq` processes (real Ray, Tune, Train, MLflow): exit status, MLflow
run status and what a resubmission reruns. The CI one checks what the session's `resubmitted`
(pipelines.py) recorded; the export tests read the store it leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pipelines import Resubmitted, faults_runs, finish, start_limpq, write_faults_config


def _wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"limpq exited with {process.returncode} before the fault could be injected")
        time.sleep(1)
    pytest.fail("timed out waiting for the moment to inject the fault")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sigint_during_sweep_then_resubmission_reuses_finished_trials(tmp_path: Path, digits_slice: Path) -> None:
    config = write_faults_config(tmp_path, digits_slice)
    first = start_limpq(["run", "--config", str(config)], tmp_path)

    def one_trial_done_and_another_running() -> bool:
        statuses = [run.info.status for run in faults_runs(tmp_path, "trial")]
        return "FINISHED" in statuses and "RUNNING" in statuses

    _wait_for(one_trial_done_and_another_running, 900, first)
    first.send_signal(signal.SIGINT)
    assert finish(first, 180) == 130
    [sweep] = faults_runs(tmp_path, "sweep")
    assert sweep.info.status == "KILLED"
    [root] = faults_runs(tmp_path, "pipeline")
    assert root.info.status == "KILLED"
    trials = {run.info.run_name: run for run in faults_runs(tmp_path, "trial")}
    finished = {name for name, run in trials.items() if run.info.status == "FINISHED"}
    assert finished and all(run.info.status in ("FINISHED", "KILLED") for run in trials.values())

    second = start_limpq(["run", "--config", str(config)], tmp_path)
    assert finish(second) == 0
    [sweep] = faults_runs(tmp_path, "sweep")
    assert sweep.info.status == "FINISHED" and sweep.data.tags["limpq.attempts"] == "2"
    trials_after = {run.info.run_name: run for run in faults_runs(tmp_path, "trial")}
    assert set(trials_after) == {"W4A4", "W3A3", "uniform-W2A2"}
    assert all(run.info.status == "FINISHED" for run in trials_after.values())
    for name in finished:  # reused from MLflow, not trained again
        assert trials_after[name].data.tags["limpq.attempts"] == "1"
        assert trials_after[name].data.metrics == trials[name].data.metrics


def _sigterm_ends_143_with_nothing_running(process: subprocess.Popen, tmp_path: Path) -> None:
    """SIGTERM to the driver alone (as `ray job stop` and a scheduler send it): exit 143, no native
    abort on the console, and no run of the tree left RUNNING."""
    process.send_signal(signal.SIGTERM)
    assert finish(process, 300) == 143
    console = next(tmp_path.glob("limpq-*.log")).read_text()
    assert "limpq: stopped by signal SIGTERM" in console and "Aborted" not in console, console[-2000:]
    runs = faults_runs(tmp_path)
    assert runs and not [run.info.run_name for run in runs if run.info.status == "RUNNING"]


@pytest.mark.timeout(900)
def test_sigterm_during_indicator_training_exits_143_and_leaves_no_run_running(tmp_path: Path,
                                                                              digits_slice: Path) -> None:
    config = write_faults_config(tmp_path, digits_slice, indicators={"epochs": 20})
    first = start_limpq(["run", "--config", str(config)], tmp_path)

    def training() -> bool:  # the Train fit is running on its helper thread
        runs = faults_runs(tmp_path, "indicators")
        return bool(runs) and "epoch" in runs[0].data.metrics

    _wait_for(training, 600, first)
    _sigterm_ends_143_with_nothing_running(first, tmp_path)
    [indicators] = faults_runs(tmp_path, "indicators")
    assert indicators.info.status == "KILLED" and "Terminated" in indicators.data.tags["limpq.error"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sigterm_while_trials_run_exits_143_and_marks_every_trial_killed(tmp_path: Path, digits_slice: Path) -> None:
    config = write_faults_config(tmp_path, digits_slice, ray={"max_concurrent_trials": 2})
    first = start_limpq(["run", "--config", str(config)], tmp_path)
    _wait_for(lambda: "RUNNING" in [run.info.status for run in faults_runs(tmp_path, "trial")], 900, first)
    _sigterm_ends_143_with_nothing_running(first, tmp_path)
    assert {run.info.status for run in faults_runs(tmp_path, "trial")} <= {"KILLED", "FINISHED"}
    assert [run.info.status for run in faults_runs(tmp_path, "sweep")] == ["KILLED"]


@pytest.mark.timeout(1800)  # in CI: the fault-injection test (its set-up is the session's `resubmitted`)
def test_trial_failing_past_its_retries_exits_1_and_resubmission_reruns_only_it(resubmitted: Resubmitted) -> None:
    assert resubmitted.first_exit == 1
    assert resubmitted.fault_injected
    trials = resubmitted.trials_after_first
    assert trials["W3A3"].info.status == "FAILED" and "fails once" in trials["W3A3"].data.tags["limpq.error"]
    [sweep] = resubmitted.sweeps_after_first
    assert sweep.info.status == "FAILED"

    assert resubmitted.second_exit == 0
    after = resubmitted.trials
    assert after["W3A3"].info.status == "FINISHED" and after["W3A3"].data.tags["limpq.attempts"] == "2"
    for run in after.values():  # finetune.epochs 0: scored with the joint model, no Train run
        assert run.data.params["trial.evaluation"] == "joint model, no fine-tuning"
        assert "limpq.steps_per_epoch" not in run.data.tags and "val_top1" in run.data.metrics
    assert set(after) == {"W3A3", "uniform-W2A2"} and after["uniform-W2A2"].data.tags["limpq.attempts"] == "1"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_driver_killed_during_indicator_training_resumes_from_train_checkpoint(tmp_path: Path,
                                                                              digits_slice: Path) -> None:
    config = write_faults_config(tmp_path, digits_slice, indicators={"epochs": 3})
    first = start_limpq(["indicators", "train", "--config", str(config)], tmp_path)

    def second_epoch_logged() -> bool:  # so epoch 1's checkpoint was surely reported
        runs = faults_runs(tmp_path, "indicators")
        return bool(runs) and runs[0].data.metrics.get("epoch", 0) >= 2

    _wait_for(second_epoch_logged, 900, first)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, with no chance to clean up
    first.wait()

    second = start_limpq(["indicators", "train", "--config", str(config), "--set", "ray.num_workers=2"], tmp_path)
    assert finish(second) == 0
    [run] = faults_runs(tmp_path, "indicators")
    assert run.info.status == "FINISHED" and run.data.tags["limpq.attempts"] == "2"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    epochs = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "epoch"))
    assert epochs[-1] == 3 and epochs.count(1) == 1, f"epoch 1 was trained again: {epochs}"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_same_config_and_seed_give_the_same_indicators_and_top1(tmp_path: Path, digits_slice: Path) -> None:
    """Seeds mean something: data order, augmentation and the random policies repeat on CPU, so two runs
    of one config (under two names, so nothing is reused) agree exactly."""
    import json

    results = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        config = write_faults_config(tmp_path / name, digits_slice, search={"budgets": [{"target_wbits": 3, "target_abits": 3}]},
                               finetune={"epochs": 1, "baselines": []})
        raw = yaml.safe_load(config.read_text())
        raw["name"] = name
        config.write_text(yaml.safe_dump(raw))
        assert finish(start_limpq(["run", "--config", str(config)], tmp_path / name)) == 0
        client = MlflowClient(raw["mlflow"]["tracking_uri"])
        experiment = client.get_experiment_by_name("faults")
        [indicators] = client.searchfaults_runs([experiment.experiment_id], "tags.`limpq.stage` = 'indicators'")
        [trial] = client.searchfaults_runs([experiment.experiment_id], "tags.`limpq.stage` = 'trial'")
        document = json.loads(Path(client.download_artifacts(indicators.info.run_id, "indicators.json",
                                                             str(tmp_path / name))).read_text())
        results.append((document["layers"], trial.data.metrics["val_top1"], indicators.data.metrics["loss_w2"]))
    assert results[0] == results[1]
