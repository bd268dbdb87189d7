"""Tiny pipeline configs for the end-to-end tests: resnet18 at 16x16 on the digits slice (80 train,
40 val images), with everything it writes (outputs, Ray storage, an sqlite MLflow store) under the
test's directory. Each test states only what it changes.

Also the two pipelines that tests of several modules read (session fixtures, each run once per test
session; conftest.py loads this module as a plugin): `sweep`, fine-tuned in-process with a trial that
fails once and is retried, then submitted again; `resubmitted`, `limpq run` one-shot with a trial that
fails past its retries, then submitted again. A test that changes a store runs its own pipeline."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from faults import fail_once
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.checks.preflight import preflight
from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.run import run_pipeline
from orchestrator.distributed.runtime import dashboard_url
from orchestrator.tracking.models import registered_model_name
from orchestrator.tracking.runs import Tracker

REPO = Path(__file__).resolve().parents[1]
LIMPQ = [str(Path(sys.executable).parent / "limpq")]  # the console script, as a user runs it


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


# -- `limpq` as a user runs it: the fault-injection tests ---------------------------------------------

def write_faults_config(tmp_path: Path, data: Path, **sections: dict[str, Any]) -> Path:
    """The config of the fault-injection runs (experiment "faults"): two budgets and a uniform
    baseline fine-tuned one at a time, no retries; each of `sections` updated with the keys given."""
    raw = tiny_raw(tmp_path, data, "faults",
                   search={"budgets": [{"target_wbits": 4, "target_abits": 4}, {"target_wbits": 3, "target_abits": 3}]},
                   finetune={"epochs": 1, "train_fraction": 0.5, "baselines": [2]},
                   ray={"max_failures": 0, "max_concurrent_trials": 1})
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return write_config(tmp_path / "config.yaml", raw)


def start_limpq(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(tmp_path / f"limpq-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([*LIMPQ, *args], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def faults_runs(tmp_path: Path, stage: str | None = None) -> list[Run]:
    """The runs of experiment "faults" in the store under `tmp_path` (of `stage` when given)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    if experiment is None:
        return []
    query = f"tags.`limpq.stage` = '{stage}'" if stage else ""
    return client.search_runs([experiment.experiment_id], query)


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Resubmitted:
    config: Path
    first_exit: int
    fault_injected: bool
    trials_after_first: dict[str, Run]
    sweeps_after_first: list[Run]
    second_exit: int
    trials: dict[str, Run]  # after the resubmission


@pytest.fixture(scope="session")
def resubmitted(tmp_path_factory: pytest.TempPathFactory, digits_slice: Path) -> Resubmitted:
    """`limpq run` of a one-shot sweep (budget W3A3 and the uniform W2A2 baseline, scored with the joint
    model: no fine-tuning run) whose trial W3A3 raises once with no retry left, then the same command
    again. What its store holds at the end, a finished one-shot pipeline, is what the export tests read."""
    tmp_path = tmp_path_factory.mktemp("resubmitted")
    config = write_faults_config(tmp_path, digits_slice, search={"budgets": [{"target_wbits": 3, "target_abits": 3}]},
                                 finetune={"epochs": 0})
    marker = tmp_path / "failed"
    faults = fail_once(tmp_path / "faults", "orchestrator.distributed.trial", "_policy_metrics",
                       "args[0].label == 'W3A3'", marker)
    first_exit = finish(start_limpq(["run", "--config", str(config)], tmp_path, env={"PYTHONPATH": faults}))
    trials_after_first = {run.info.run_name: run for run in faults_runs(tmp_path, "trial")}
    sweeps_after_first = faults_runs(tmp_path, "sweep")
    second_exit = finish(start_limpq(["run", "--config", str(config)], tmp_path))
    return Resubmitted(config, first_exit, marker.exists(), trials_after_first, sweeps_after_first, second_exit,
                       {run.info.run_name: run for run in faults_runs(tmp_path, "trial")})


# -- the budget sweep in-process: the end-to-end test of the pipeline ---------------------------------

@dataclass
class Sweep:
    cfg: PipelineConfig
    tmp_path: Path
    tracker: Tracker
    client: MlflowClient
    rows: list[dict]
    printed: str
    dashboard: str | None  # the Ray dashboard's URL while the Ray the pipeline started was up
    dashboard_status: int | None  # and what it answered
    runs: list[Run]  # after the first submission
    by_stage: dict[str, list[Run]]
    trials: dict[str, Run]
    versions: dict
    resubmitted: list[dict]
    printed_again: str
    runs_after: list[Run]  # after the resubmission
    versions_after: list


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory, digits_slice: Path) -> Sweep:
    """The whole pipeline on real Ray Tune + Ray Train + MLflow: FP training, indicators at 4, 3 and 2
    bits, budgets W3A3 and 0.1 GBitOps and the uniform W3A3 baseline each fine-tuned for an epoch, in
    the local Ray it starts; trial W3A3 raises once and Tune retries it. Then submitted again."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(tmp_path, digits_slice, "sweep", fp={"epochs": 1, "train_fraction": 1.0},
                      indicators={"bits": [4, 3, 2]},
                      search={"budgets": [{"target_wbits": 3, "target_abits": 3}, {"bitops_g": 0.1}]},
                      finetune={"epochs": 1, "train_fraction": 1.0, "baselines": [3]}, ray={"max_failures": 1},
                      mlflow={"experiment": "test-sweep"})
    marker = tmp_path / "failed-once"
    printed, printed_again = io.StringIO(), io.StringIO()
    dashboard = dashboard_status = None
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            # trial W3A3 raises once, after opening its run; the local Ray the pipeline starts passes PYTHONPATH on
            patch.setenv("PYTHONPATH", fail_once(tmp_path / "faults", "orchestrator.distributed.trial",
                                                 "_policy_metrics", "args[0].label == 'W3A3'", marker))
            rows = run_pipeline(preflight(cfg))
        dashboard = dashboard_url()  # Ray's own view, while Ray is up
        if dashboard is not None:
            with urllib.request.urlopen(dashboard, timeout=30) as page:
                dashboard_status = page.status
        assert marker.exists(), "the fault was not injected"
        tracker = Tracker.from_config(cfg)
        client = tracker.client
        runs = client.search_runs([tracker.experiment_id], "")
        by_stage: dict[str, list[Run]] = {}
        for run in runs:
            by_stage.setdefault(run.data.tags["limpq.stage"], []).append(run)
        name = registered_model_name(cfg)
        versions = {v.tags["budget"]: v for v in client.search_model_versions(f"name = '{name}'")}
        with contextlib.redirect_stdout(printed_again):
            again = run_pipeline(preflight(cfg))
    finally:
        ray.shutdown()
    return Sweep(cfg, tmp_path, tracker, client, rows, printed.getvalue(), dashboard, dashboard_status, runs,
                 by_stage, {run.info.run_name: run for run in by_stage["trial"]}, versions, again,
                 printed_again.getvalue(), client.search_runs([tracker.experiment_id], ""),
                 client.search_model_versions(f"name = '{name}'"))
