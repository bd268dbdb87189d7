"""MLflow runs of pipeline stages: one MLflow run per stage (FP, indicators, sweep, trial...).

Every call goes through `MlflowClient` with an explicit run id, never MLflow's global active run, so
any one process (the driver, Ray Train rank 0, a Tune trial) can write any run, and one process can
write several runs. A `Tracker` holds only the tracking URI and experiment name: it pickles, so it
can be shipped to Ray workers.

Runs form one tree per pipeline submission: a root run named after the pipeline and its key, the
stage runs (FP, indicators, sweep) as its children, one run per trial under the sweep. A stage run
is identified by its tags (pipeline name, stage, stage key, run name, parent). Opening a stage whose
earlier run did not finish reopens that run, so a resubmitted job continues it instead of leaving a
half run behind; a finished one lets the pipeline skip the stage and take its outputs (artifacts).

Params are the settings that define results; where work runs (`ray.*`) goes into tags, which may
change between submissions. Credentials never reach params, tags or printed commands.

Calls go to MLflow's client as they are: it splits `log_batch` into MLflow's batch sizes itself, and
concurrent writers to one sqlite store (the driver, a Train worker, several Tune trials) need no
retries of ours: sqlite's own lock wait covers them (measured: 4-6 processes writing at once, with
runs, params, tags, metrics, searches, logged models, model versions and aliases, 1,692 calls, met no
"database is locked"). Other modules write through `Tracker`'s methods, not its client. Logging and
registering models is in `orchestrator.tracking.models`.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.config.schema import PipelineConfig
from orchestrator.compat import (
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_PARENT_RUN_ID,
    dataset_entity,
    logged_model_id,
    mlflow_context_tags,
)
from orchestrator.common.source import git_commit
from orchestrator.common.errors import UserError
from orchestrator.common.redact import redact, redact_params
from orchestrator.tracking.ui import (
    EXPERIMENT_KIND_TAG,
    MODEL_DEVELOPMENT,
    experiment_page,
    mark_model_development,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_PREFIX = "sqlite:///"
ARTIFACTS_DIR_NAME = "mlartifacts"

TAG_PIPELINE = "limpq.pipeline"
TAG_STAGE = "limpq.stage"
TAG_STAGE_KEY = "limpq.stage_key"
TAG_ROOT = "limpq.root_run_id"
TAG_ATTEMPTS = "limpq.attempts"
TAG_ERROR = "limpq.error"
TAG_RAY_JOB = "limpq.ray_job_submission_id"
TAG_NOTE = "mlflow.note.content"

# Settings that say where and how work runs, not what it computes: tags, so they may change.
# `training.compile` computes the same numbers to float tolerance (it is no part of the stage keys).
_PLACEMENT_TAGS = ("ray.", "training.compile")
_PLACEMENT_SECTIONS = (*_PLACEMENT_TAGS, "mlflow.", "output_dir", "name")

UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """cfg.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else MLflow 3's default sqlite:///mlflow.db.

    A relative sqlite path is made absolute here, in the process that reads the config, because Ray
    workers and `ray job submit --working-dir` run in other working directories.
    """
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE_PREFIX):
        db_path = unquote(uri.removeprefix(SQLITE_PREFIX))
        if db_path != ":memory:":
            return SQLITE_PREFIX + str(Path(db_path).absolute())
        return uri
    is_file_store = "://" not in uri or uri.startswith("file:")
    if is_file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise UserError(
            f"mlflow.tracking_uri: {uri!r} is a file store, which MLflow 3 refuses; "
            f"use a database such as {DEFAULT_TRACKING_URI} or a tracking server http://host:port"
        )
    return uri


def result_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings that define results, for MLflow params (credentials redacted)."""
    return redact_params({key: value for key, value in cfg.flat().items()
                          if not key.startswith(_PLACEMENT_SECTIONS)})


def placement_tags(cfg: PipelineConfig) -> dict[str, str]:
    """Where and how a run's work is placed (`ray.*`, `training.compile`): tags, rewritten on every attempt."""
    return redact_params({f"limpq.{key}": str(value) for key, value in cfg.flat().items()
                          if key.startswith(_PLACEMENT_TAGS)})


def ray_job_submission_id() -> str | None:
    """The `ray job submit` id when this process is a submitted job's driver."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:
        return None
    try:
        return json.loads(job_config).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


@lru_cache(maxsize=1)
def _package_commit() -> str | None:
    """The commit of the checkout this package runs from (MLflow looks only at the main script's)."""
    return git_commit(Path(__file__).resolve().parent)


def context_tags() -> dict[str, str]:
    """MLflow's standard run tags (user, source, git commit) as the fluent API would set them, plus
    the Ray job id. The commit is the running package's checkout's when MLflow finds none; under
    `ray job submit` the uploaded working dir has no .git, and `limpq submit` passes it as
    LIMPQ_GIT_COMMIT."""
    tags = {key: str(value) for key, value in mlflow_context_tags().items()}
    tags.setdefault("mlflow.user", getpass.getuser())
    commit = os.environ.get("LIMPQ_GIT_COMMIT") or _package_commit()
    if commit:
        tags.setdefault("mlflow.source.git.commit", commit)
    job = ray_job_submission_id()
    if job:
        tags[TAG_RAY_JOB] = job
        tags["mlflow.source.type"] = "JOB"
    tags["mlflow.source.name"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] if sys.argv else "limpq"
    return {key: redact(value) for key, value in tags.items()}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:MAX_PARAM_VAL_LENGTH]


@lru_cache(maxsize=None)
def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


@dataclass(frozen=True)
class Tracker:
    """Writes stage runs of one experiment at one tracking URI."""

    tracking_uri: str
    experiment: str

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> Tracker:
        return cls(resolve_tracking_uri(cfg), cfg.mlflow.experiment)

    @property
    def client(self) -> MlflowClient:
        return _client(self.tracking_uri)

    @property
    def experiment_id(self) -> str:
        return _experiment_id(self)

    def _artifact_location(self) -> str | None:
        """Artifacts of a local sqlite store go next to the database, not into the current directory."""
        if not self.tracking_uri.startswith(SQLITE_PREFIX):
            return None
        db_path = Path(unquote(self.tracking_uri.removeprefix(SQLITE_PREFIX)))
        return str(db_path.parent / ARTIFACTS_DIR_NAME) if db_path.is_absolute() else None

    # ----------------------------------------------------------------------------- stage runs

    def _stage_runs(self, cfg: PipelineConfig, stage: str, key: str, run_name: str) -> list[Run]:
        # Only the hex key and the stage go into the filter string: user-chosen names may hold quotes.
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_STAGE_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}'",
            order_by=["attributes.start_time DESC"],
        )
        return [run for run in runs if run.data.tags.get(TAG_PIPELINE) == cfg.name and run.info.run_name == run_name]

    def find_finished_stage_run(self, cfg: PipelineConfig, stage: str, key: str, run_name: str | None = None,
                                parent_run_id: str | None = None) -> str | None:
        """The newest FINISHED run of this stage and key (under `parent_run_id` when given), else None.

        FP and indicator runs are looked up under any parent: a pipeline that differs only in later
        settings reuses them."""
        runs = self._stage_runs(cfg, stage, key, run_name or stage)
        return next((run.info.run_id for run in runs if run.info.status == "FINISHED"
                     and (parent_run_id is None or run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id)), None)

    def open_stage_run(self, cfg: PipelineConfig, stage: str, key: str, parent_run_id: str | None = None,
                       run_name: str | None = None, extra_tags: Mapping[str, str] | None = None,
                       description: str | None = None) -> StageRun:
        """Reopen this stage's newest unfinished run with the same key and parent, or create one.

        Params: the result-defining settings; tags: MLflow's context tags, placement (`ray.*`), the
        root run, `extra_tags` and the description (shown on the run's page)."""
        run_name = run_name or stage
        unfinished = [run for run in self._stage_runs(cfg, stage, key, run_name)
                      if run.info.status in UNFINISHED_STATUSES
                      and run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id]
        tags = {**context_tags(), TAG_PIPELINE: cfg.name, TAG_STAGE: stage, TAG_STAGE_KEY: key,
                **placement_tags(cfg), **(extra_tags or {})}
        if description:
            tags[TAG_NOTE] = description
        params = result_params(cfg)
        if unfinished:
            run = unfinished[0]
            run_id = run.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in run.data.tags:
                self.client.delete_tag(run_id, TAG_ERROR)
            tags[TAG_ATTEMPTS] = str(int(run.data.tags.get(TAG_ATTEMPTS, "1")) + 1)
            self.set_tags(run_id, tags)
            self.log_params(run_id, {key: value for key, value in params.items() if key not in run.data.params})
            return StageRun(self, run_id, resumed=True)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tags[TAG_ATTEMPTS] = "1"
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.log_params(run.info.run_id, params)
        return StageRun(self, run.info.run_id, resumed=False)

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        """End a run; `error` (for FAILED/KILLED runs) is kept in the `limpq.error` tag."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish: status must be FINISHED, FAILED or KILLED, not {status!r}")
        if error:
            self.set_tags(run_id, {TAG_ERROR: redact(error)})
        self.client.set_terminated(run_id, status=status)

    def kill_open_runs(self, root_run_id: str, reason: str) -> list[str]:
        """Mark every RUNNING run of a pipeline's tree KILLED (after an interrupt); returns their ids."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_ROOT}` = '{root_run_id}' and attributes.status = 'RUNNING'")
        ids = [run.info.run_id for run in runs]
        root = self.client.get_run(root_run_id)
        if root.info.status == "RUNNING":
            ids.append(root_run_id)
        for run_id in ids:
            self.finish(run_id, "KILLED", reason)
        return ids

    # ------------------------------------------------------------------------------ logging

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Values are stringified (JSON for non-strings) and cut to MLflow's length limit."""
        self.client.log_batch(run_id, params=[Param(key, _param_value(value)) for key, value in params.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp, step)
                                               for key, value in metrics.items()])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Values are stringified and cut to MLflow's length limit."""
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()])

    def log_dataset(self, run_id: str, source_uri: str, name: str, digest: str, context: str,
                    extra: Mapping[str, Any] | None = None) -> None:
        """Dataset lineage (`mlflow.log_input`): where the data is, its content digest, the split used
        (`context`) and sizes as input tags."""
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        tags += [InputTag(f"limpq.{key}", str(value)) for key, value in (extra or {}).items()]
        entity = dataset_entity(redact(source_uri), name, digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])

    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        """Upload the local file `path` into the run's artifacts (under `folder` when given)."""
        self.client.log_artifact(run_id, str(path), folder)

    def log_dict(self, run_id: str, document: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, document, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, columns: Mapping[str, list], artifact_file: str) -> None:
        """An MLflow table artifact: shown in the run's artifact view and the UI's evaluation tab."""
        self.client.log_table(run_id, dict(columns), artifact_file)

    def download_artifact(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Copy the run's artifact file or folder `path` under `dst`; returns the local path."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each of the run's metrics."""
        return dict(self.client.get_run(run_id).data.metrics)

    def child_runs(self, parent_run_id: str) -> list[Run]:
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
                                       order_by=["attributes.start_time ASC"])

    # ---------------------------------------------------------------------------- the registry

    def register_version(self, name: str, model_uri: str, run_id: str, tags: Mapping[str, Any],
                         description: str) -> str:
        """A new version of registered model `name` (created with `description` if missing) from the
        logged model at `model_uri`; returns the version."""
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # a tracking server rejects a `models:/<id>` source unless the version names that model id
        version = self.client.create_model_version(name, model_uri, run_id=run_id,
                                                   tags={key: str(value) for key, value in tags.items()},
                                                   model_id=logged_model_id(model_uri))
        return str(version.version)

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def model_versions(self, name: str, run_id: str | None = None) -> list[str]:
        """Versions of registered model `name` (created from `run_id` when given), newest first."""
        query = f"name = '{name}'" + (f" and run_id = '{run_id}'" if run_id else "")
        versions = self.client.search_model_versions(query)
        return [str(v.version) for v in sorted(versions, key=lambda v: -int(v.version))]

    def has_model_versions(self, name: str) -> bool:
        return bool(self.client.search_model_versions(f"name = '{name}'", max_results=1))

    def ui_command(self) -> str:
        """The command that opens the MLflow UI on this store (credentials redacted)."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {experiment_page(redact(self.tracking_uri), self.experiment_id)}"
        return (f"mlflow ui --host 127.0.0.1 --backend-store-uri '{redact(self.tracking_uri)}', then open "
                f"{experiment_page('http://127.0.0.1:5000', self.experiment_id)}")


@lru_cache(maxsize=None)
def _experiment_id(tracker: Tracker) -> str:
    experiment = tracker.client.get_experiment_by_name(tracker.experiment)
    if experiment is None:
        try:
            return tracker.client.create_experiment(tracker.experiment, tracker._artifact_location(),
                                                    tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = tracker.client.get_experiment_by_name(tracker.experiment)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"mlflow.experiment: experiment {tracker.experiment!r} is deleted in {tracker.tracking_uri}; "
            "restore it (mlflow experiments restore) or choose another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # the UI then opens on runs, not on GenAI pages
        mark_model_development(tracker.client, experiment.experiment_id)
    return experiment.experiment_id


@dataclass
class StageRun:
    """An open stage run. As a context manager it ends the run: FINISHED on success (FAILED instead
    after `fail()`), FAILED with the error on an exception, KILLED on an interrupt."""

    tracker: Tracker
    run_id: str
    resumed: bool
    failure: str | None = None

    def fail(self, error: str) -> None:
        """The work ran to its end but did not succeed (e.g. some trials failed): end the run FAILED."""
        self.failure = error

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> None:
        if exc is None:
            self.tracker.finish(self.run_id, "FAILED" if self.failure else "FINISHED", error=self.failure)
        else:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            self.tracker.finish(self.run_id, status, error=f"{type(exc).__name__}: {exc}")
