"""Stage runs on a real MLflow sqlite store: params, metrics, artifacts, reopening, skipping, nesting,
failures, and several processes writing their own runs at once."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config.schema import PipelineConfig
from orchestrator.common.errors import UserError
from orchestrator.common.redact import redact
from orchestrator.tracking.models import log_model, register_model
from orchestrator.tracking.runs import Tracker, resolve_tracking_uri, result_params

EXPERIMENT = "tracking-tests"
KEY = "0123abcd4567"  # a stage key, as orchestrator.checks.stage_keys computes them


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module: MLflow's schema migration takes seconds on a new database."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def make_config(store: Path, request: pytest.FixtureRequest):
    """Configs of a pipeline named after the test, so tests sharing the store never see each other's runs."""

    def make(**overrides) -> PipelineConfig:
        raw = {
            "name": request.node.name,
            "data": {"demo": True},
            "mlflow": {"tracking_uri": f"sqlite:///{store}", "experiment": EXPERIMENT},
            **overrides,
        }
        return PipelineConfig.model_validate(raw)

    return make


@pytest.fixture
def client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store}")


def _runs_of(client: MlflowClient, cfg: PipelineConfig, stage: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`limpq.stage` = '{stage}'")
    return [run for run in runs if run.data.tags["limpq.pipeline"] == cfg.name]


def _run_in_subprocess(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_stage_run_is_tagged_and_holds_the_whole_config(make_config, client, store):
    budgets = [{"name": "tight", "target_wbits": 2, "target_abits": 3}, {"bitops_g": 1.5}]
    cfg = make_config(search={"budgets": budgets})
    run = Tracker.from_config(cfg).open_stage_run(cfg, "fp", KEY)
    stored = client.get_run(run.run_id)

    assert not run.resumed
    assert stored.info.run_name == "fp"
    assert stored.info.status == "RUNNING"
    assert stored.data.tags["limpq.pipeline"] == cfg.name
    assert stored.data.tags["limpq.stage"] == "fp"
    assert stored.data.tags["limpq.stage_key"] == KEY
    assert stored.data.tags["limpq.ray.num_workers"] == "1"
    params = stored.data.params
    # params are the settings that define results (training.bf16 among them); placement (ray.*,
    # training.compile, which computes the same numbers to float tolerance) and logging settings are tags
    assert set(params) == {key for key in cfg.flat()
                           if not key.startswith(("ray.", "training.compile", "mlflow.", "output_dir", "name"))}
    assert "training.bf16" in params and "limpq.training.bf16" not in stored.data.tags
    assert stored.data.tags["limpq.training.compile"] == "auto" and "training.compile" not in params
    assert params["model.arch"] == "resnet18"
    assert params["seed"] == "0"
    assert json.loads(params["indicators.bits"]) == [6, 5, 4, 3, 2]
    assert json.loads(params["model.fixed_layers"]) is None
    assert [budget["name"] for budget in json.loads(params["search.budgets"])] == ["tight", None]
    # Artifacts of a local store live beside the database, not in whatever directory the job ran in.
    assert stored.info.artifact_uri.startswith(str(store.parent / "mlartifacts"))


def test_params_beyond_one_mlflow_batch(make_config, client):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    run = tracker.open_stage_run(cfg, "sweep", KEY)
    many = {f"extra.p{index:03d}": index for index in range(250)}
    tracker.log_params(run.run_id, {**many, "extra.long": "x" * 7000})

    params = client.get_run(run.run_id).data.params
    assert all(params[key] == str(value) for key, value in many.items())
    assert params["extra.long"] == "x" * 6000  # MLflow's param value limit
    assert len(params) == len(result_params(cfg)) + 251


def test_metrics_keep_their_steps(make_config, client):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    run = tracker.open_stage_run(cfg, "indicators", KEY)
    for epoch in range(3):
        tracker.log_metrics(run.run_id, {"loss/w4a4": 2.0 - epoch, "images_per_s": 100 + epoch}, step=epoch)

    history = client.get_metric_history(run.run_id, "loss/w4a4")
    assert sorted((metric.step, metric.value) for metric in history) == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert client.get_run(run.run_id).data.metrics["images_per_s"] == 102


def test_artifacts_are_stored_and_downloadable(make_config, client, tmp_path):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    run = tracker.open_stage_run(cfg, "indicators", KEY)
    checkpoint = tmp_path / "final.pt"
    checkpoint.write_bytes(b"\x00checkpoint bytes\xff")
    tracker.client.log_artifact(run.run_id, str(checkpoint), "checkpoints")
    tracker.client.log_dict(run.run_id, {"format": "limpq-indicators/v1", "bits": [4, 2]}, "indicators.json")
    tracker.client.log_text(run.run_id, "budget,top1\nW3A3,0.9\n", "summary.csv")

    artifacts = {item.path for item in client.list_artifacts(run.run_id)}
    assert artifacts == {"checkpoints", "indicators.json", "summary.csv"}
    downloaded = tracker.download_artifact(run.run_id, "checkpoints/final.pt", tmp_path / "down")
    assert downloaded.read_bytes() == checkpoint.read_bytes()
    indicators = tracker.download_artifact(run.run_id, "indicators.json", tmp_path / "down")
    assert json.loads(indicators.read_text()) == {"format": "limpq-indicators/v1", "bits": [4, 2]}


def test_run_left_running_by_a_killed_process_is_continued(make_config, client, tmp_path):
    cfg = make_config()
    crashed = _run_in_subprocess(
        f"""
        import os
        from orchestrator.config.schema import PipelineConfig
        from orchestrator.tracking.runs import Tracker
        cfg = PipelineConfig.model_validate_json({cfg.model_dump_json()!r})
        tracker = Tracker.from_config(cfg)
        run = tracker.open_stage_run(cfg, "indicators", {KEY!r})
        tracker.log_metrics(run.run_id, {{"top1": 0.25}}, step=0)
        print(run.run_id, flush=True)
        os._exit(3)  # dies like a killed job: no cleanup, the run stays RUNNING
        """,
        tmp_path,
    )
    assert crashed.returncode == 3, crashed.stderr
    first_run_id = crashed.stdout.split()[-1]
    assert client.get_run(first_run_id).info.status == "RUNNING"

    # The resubmission may differ in where and how Ray runs.
    resubmitted = make_config(ray={"address": "ray://head:10001", "num_workers": 4})
    tracker = Tracker.from_config(resubmitted)
    with tracker.open_stage_run(resubmitted, "indicators", KEY) as run:
        assert (run.run_id, run.resumed) == (first_run_id, True)
        tracker.log_metrics(run.run_id, {"top1": 0.5}, step=1)

    runs = _runs_of(client, cfg, "indicators")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(first_run_id, "FINISHED")]
    assert runs[0].data.tags["limpq.attempts"] == "2"
    assert runs[0].data.tags["limpq.ray.num_workers"] == "4"  # placement tags follow the latest attempt
    assert sorted(metric.step for metric in client.get_metric_history(first_run_id, "top1")) == [0, 1]


def test_failed_run_records_the_error_and_is_reopened(make_config, client):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    with pytest.raises(ValueError, match="loss is NaN"):
        with tracker.open_stage_run(cfg, "fp", KEY) as run:
            raise ValueError("loss is NaN at epoch 2")
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["limpq.error"] == "ValueError: loss is NaN at epoch 2"
    assert tracker.find_finished_stage_run(cfg, "fp", KEY) is None

    reopened = tracker.open_stage_run(cfg, "fp", KEY)
    assert (reopened.run_id, reopened.resumed) == (run.run_id, True)
    assert "limpq.error" not in client.get_run(run.run_id).data.tags
    tracker.finish(reopened.run_id)
    assert tracker.find_finished_stage_run(cfg, "fp", KEY) == run.run_id
    assert [run.info.status for run in _runs_of(client, cfg, "fp")] == ["FINISHED"]


def test_interrupted_run_is_killed(make_config, client):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    with pytest.raises(KeyboardInterrupt):
        with tracker.open_stage_run(cfg, "sweep", KEY) as run:
            raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_find_finished_keys_on_stage_key_stage_and_name(make_config):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    with tracker.open_stage_run(cfg, "fp", KEY) as finished:
        pass

    assert tracker.find_finished_stage_run(cfg, "fp", KEY) == finished.run_id
    assert tracker.find_finished_stage_run(make_config(ray={"storage_path": "/elsewhere"}), "fp", KEY) == finished.run_id
    assert tracker.find_finished_stage_run(make_config(name="other"), "fp", KEY) is None
    assert tracker.find_finished_stage_run(cfg, "indicators", KEY) is None
    assert tracker.find_finished_stage_run(cfg, "fp", KEY, run_name="fp-retrain") is None
    assert tracker.find_finished_stage_run(cfg, "fp", "0123456789ab") is None
    # A finished stage is never reopened: opening it again starts a new run.
    assert tracker.open_stage_run(cfg, "fp", KEY).run_id != finished.run_id


def test_nested_trial_runs_carry_the_parent_id(make_config, client):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    sweep = tracker.open_stage_run(cfg, "sweep", KEY)
    trials = {name: tracker.open_stage_run(cfg, "trial", KEY, parent_run_id=sweep.run_id, run_name=name,
                                           extra_tags={"limpq.budget": name})
              for name in ("W3A3", "W2A2")}

    children = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{sweep.run_id}'")
    assert {run.info.run_id: run.info.run_name for run in children} == {
        trial.run_id: name for name, trial in trials.items()
    }
    assert all(run.data.tags["limpq.budget"] == run.info.run_name for run in children)
    assert "mlflow.parentRunId" not in client.get_run(sweep.run_id).data.tags
    # An unfinished trial is reopened under its own parent only.
    again = tracker.open_stage_run(cfg, "trial", KEY, parent_run_id=sweep.run_id, run_name="W3A3")
    assert again.run_id == trials["W3A3"].run_id
    other_parent = tracker.open_stage_run(cfg, "sweep", KEY, run_name="sweep-2")
    assert tracker.open_stage_run(cfg, "trial", KEY, parent_run_id=other_parent.run_id, run_name="W3A3").run_id not in {
        trial.run_id for trial in trials.values()
    }


def test_processes_write_their_own_runs_at_once(make_config, client, tmp_path):
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    sweep = tracker.open_stage_run(cfg, "sweep", KEY)
    steps = 40
    writer = f"""
        import sys
        from pathlib import Path
        from orchestrator.config.schema import PipelineConfig
        from orchestrator.tracking.runs import Tracker
        cfg = PipelineConfig.model_validate_json({cfg.model_dump_json()!r})
        tracker = Tracker.from_config(cfg)
        name = sys.argv[1]
        with tracker.open_stage_run(cfg, "trial", {KEY!r}, parent_run_id={sweep.run_id!r}, run_name=name) as run:
            for step in range({steps}):
                tracker.log_metrics(run.run_id, {{"top1": step / {steps}, "loss": 1.0 / (step + 1)}}, step)
            Path(name + ".json").write_text("{{}}")
            tracker.client.log_artifact(run.run_id, name + ".json", "policy")
    """
    names = [f"trial-{index}" for index in range(3)]
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), name], cwd=tmp_path,
                                  stderr=subprocess.PIPE, text=True) for name in names]
    errors = [process.communicate(timeout=180)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], errors

    trials = _runs_of(client, cfg, "trial")
    assert sorted(run.info.run_name for run in trials) == names
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == sweep.run_id
        assert len(client.get_metric_history(run.info.run_id, "top1")) == steps
        assert [item.path for item in client.list_artifacts(run.info.run_id, "policy")] == [
            f"policy/{run.info.run_name}.json"
        ]


def test_tracker_pickles_for_ray_workers(make_config, client):
    cfg = make_config()
    tracker = pickle.loads(pickle.dumps(Tracker.from_config(cfg)))
    run = tracker.open_stage_run(cfg, "fp", KEY)
    tracker.set_tags(run.run_id, {"limpq.skipped_images": 3})
    assert client.get_run(run.run_id).data.tags["limpq.skipped_images"] == "3"


def test_tracking_uri_comes_from_config_then_environment_then_local_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    configured = PipelineConfig.model_validate({"data": {"demo": True}, "mlflow": {"tracking_uri": "sqlite:///a/b.db"}})
    assert resolve_tracking_uri(configured) == f"sqlite:///{tmp_path}/a/b.db"
    plain = PipelineConfig.model_validate({"data": {"demo": True}})
    assert resolve_tracking_uri(plain) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(plain) == f"sqlite:///{tmp_path}/mlflow.db"
    assert Tracker.from_config(plain).ui_command().startswith(
        f"mlflow ui --host 127.0.0.1 --backend-store-uri 'sqlite:///{tmp_path}/mlflow.db', then open "
        "http://127.0.0.1:5000/#/experiments/")


def test_credentials_never_reach_params_tags_or_printed_commands(make_config, client):
    secret_uri = "postgresql://limpq:s3cret-pw@db.internal:5432/mlflow"
    assert redact(secret_uri) == "postgresql://limpq:***@db.internal:5432/mlflow"
    assert redact(f"error talking to {secret_uri}: refused") == "error talking to postgresql://limpq:***@db.internal:5432/mlflow: refused"
    cfg = make_config(ray={"storage_path": "s3://key:s3cret-pw@bucket/ray"},
                      mlflow={"tracking_uri": make_config().mlflow.tracking_uri, "experiment": EXPERIMENT})
    tracker = Tracker.from_config(cfg)
    run = tracker.open_stage_run(cfg, "fp", KEY)
    tracker.finish(run.run_id, "FAILED", f"could not reach {secret_uri}")
    stored = client.get_run(run.run_id)
    assert "s3cret-pw" not in json.dumps({**stored.data.params, **stored.data.tags})
    assert stored.data.tags["limpq.ray.storage_path"] == "s3://key:***@bucket/ray"
    assert "s3cret-pw" not in tracker.ui_command()


def test_file_store_uri_is_a_user_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "mlflow": {"tracking_uri": "./mlruns"}})
    with pytest.raises(UserError, match=r"mlflow.tracking_uri: './mlruns' is a file store"):
        resolve_tracking_uri(cfg)


def test_deleted_experiment_is_a_user_error(make_config, client):
    client.delete_experiment(client.create_experiment("deleted-experiment"))
    cfg = make_config(mlflow={"tracking_uri": client.tracking_uri, "experiment": "deleted-experiment"})
    with pytest.raises(UserError, match="mlflow.experiment: experiment 'deleted-experiment' is deleted"):
        Tracker.from_config(cfg).open_stage_run(cfg, "fp", KEY)


def test_models_register_through_a_tracking_server(tmp_path):
    """A tracking server checks what a sqlite store does not: a version whose source is a logged model
    (`models:/<id>`) must name that model id. The sweep registers every trial's model this way."""
    import torch
    from mlflow_browser import mlflow_server

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server.log") as url:
        cfg = PipelineConfig.model_validate({"name": "server", "data": {"demo": True},
                                             "mlflow": {"tracking_uri": url, "experiment": EXPERIMENT}})
        tracker = Tracker.from_config(cfg)
        with tracker.open_stage_run(cfg, "trial", KEY, run_name="W3A3") as run:
            uri = log_model(tracker, run.run_id, torch.nn.Linear(4, 2), torch.zeros(1, 4))
            version = register_model(tracker, "server-model", uri, run.run_id, {"limpq.budget": "W3A3"},
                                     ["budget-w3a3"])
        registered = MlflowClient(url).get_model_version_by_alias("server-model", "budget-w3a3")
        assert registered.version == version and registered.source == uri
        assert registered.tags["limpq.budget"] == "W3A3"
        logged = MlflowClient(url).get_logged_model(uri.removeprefix("models:/"))
        assert logged.experiment_id == tracker.experiment_id  # the run's experiment, not Default


def test_models_are_logged_in_the_runs_experiment_under_its_artifact_root(make_config, client, tmp_path,
                                                                          monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # where MLflow would put a model of the Default experiment (./mlruns)
    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    with tracker.open_stage_run(cfg, "fp", KEY) as run:
        uri = log_model(tracker, run.run_id, torch.nn.Linear(4, 2), torch.zeros(1, 4), name="fp-model")
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.experiment_id == tracker.experiment_id
    experiment_root = client.get_experiment(tracker.experiment_id).artifact_location
    assert logged.artifact_location.startswith(experiment_root)
    assert not (tmp_path / "mlruns").exists()


def test_a_finished_pipeline_whose_sweep_run_was_deleted_has_no_summary_to_show(make_config, tmp_path):
    """`limpq run` prints a finished pipeline's table from its sweep run; with that run deleted in the MLflow
    UI there is none (and the pipeline runs its sweep again) rather than a StopIteration traceback."""
    from orchestrator.tracking.summary import read_finished_sweep

    cfg = make_config()
    tracker = Tracker.from_config(cfg)
    with tracker.open_stage_run(cfg, "pipeline", KEY) as root:
        with tracker.open_stage_run(cfg, "sweep", KEY, parent_run_id=root.run_id) as sweep:
            (tmp_path / "summary.csv").write_text("budget,top1\nW3A3,0.95\n")
            tracker.log_artifact(sweep.run_id, tmp_path / "summary.csv")
    assert read_finished_sweep(cfg, tracker, root.run_id)[0]["budget"] == "W3A3"
    tracker.client.delete_run(sweep.run_id)
    assert read_finished_sweep(cfg, tracker, root.run_id) is None
