"""MLflow tracking of pipeline stages: one MLflow run per stage (FP, indicators, sweep, trial...).

Every call goes through `MlflowClient` with an explicit run id, never MLflow's global active run, so
any one process (the driver, Ray Train rank 0, a Tune trial) can write any run, and one process can
write several runs. A `Tracker` holds only the tracking URI and experiment name: it pickles, so it
can be shipped to Ray workers.

A stage run is identified by its tags (pipeline name, stage, config hash, run name, parent). Opening
a stage whose earlier run did not finish reopens that run, so a resumed job continues it instead of
leaving a half run behind; a finished one lets the pipeline skip the stage.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from orchestrator.config import PipelineConfig
from orchestrator.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_PREFIX = "sqlite:///"
ARTIFACTS_DIR_NAME = "mlartifacts"

TAG_PIPELINE = "limpq.pipeline"
TAG_PIPELINE_ID = "limpq.pipeline_id"
TAG_STAGE = "limpq.stage"
TAG_CONFIG_HASH = "limpq.config_hash"
TAG_ATTEMPTS = "limpq.attempts"
TAG_ERROR = "limpq.error"

UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
_LOCK_RETRIES = 8


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


def pipeline_id(cfg: PipelineConfig, config_hash: str | None = None) -> str:
    """Stable across resubmissions of the same config, so a resumed pipeline finds its runs again."""
    return f"{cfg.name}-{config_hash or cfg.config_hash()}"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:MAX_PARAM_VAL_LENGTH]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_lock_error(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the client, retrying when another process holds the sqlite write lock.

        MLflow's sqlite sessions read then write in one transaction, and two processes doing that
        at once deadlock: sqlite fails one of them at once, whatever the busy timeout.
        """
        call = getattr(self.client, method)
        for attempt in range(_LOCK_RETRIES - 1):
            try:
                return call(*args, **kwargs)
            except Exception as error:
                if not _is_lock_error(error):
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0) * (1 + random.random()))
        return call(*args, **kwargs)

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

    def _stage_runs(
        self, stage: str, config_hash: str, pipeline: str, run_name: str, parent_run_id: str | None
    ) -> list[Run]:
        # Only the hex hash and the stage go into the filter string: user-chosen names may hold quotes.
        runs = self._call(
            "search_runs",
            [self.experiment_id],
            filter_string=f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}' and tags.`{TAG_STAGE}` = '{stage}'",
            order_by=["attributes.start_time DESC"],
        )
        return [
            run
            for run in runs
            if run.data.tags.get(TAG_PIPELINE) == pipeline
            and run.info.run_name == run_name
            and run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id
        ]

    def find_finished_stage_run(
        self,
        cfg: PipelineConfig,
        stage: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        config_hash: str | None = None,
    ) -> str | None:
        """The id of a FINISHED run of this stage for the same config hash (newest), else None."""
        runs = self._stage_runs(
            stage, config_hash or cfg.config_hash(), cfg.name, run_name or stage, parent_run_id
        )
        return next((run.info.run_id for run in runs if run.info.status == "FINISHED"), None)

    def open_stage_run(
        self,
        cfg: PipelineConfig,
        stage: str,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
        config_hash: str | None = None,
    ) -> StageRun:
        """Reopen this stage's newest unfinished run for the same config hash, or create a new run.

        `config_hash` defaults to the whole config's hash; a stage that depends on fewer settings may
        pass its own. The run name defaults to the stage name. Params: the flattened config.
        """
        config_hash = config_hash or cfg.config_hash()
        run_name = run_name or stage
        unfinished = [
            run
            for run in self._stage_runs(stage, config_hash, cfg.name, run_name, parent_run_id)
            if run.info.status in UNFINISHED_STATUSES
        ]
        tags = {
            TAG_PIPELINE: cfg.name,
            TAG_PIPELINE_ID: pipeline_id(cfg, config_hash),
            TAG_STAGE: stage,
            TAG_CONFIG_HASH: config_hash,
            **(extra_tags or {}),
        }
        if unfinished:
            run = unfinished[0]
            run_id = run.info.run_id
            self._call("update_run", run_id, status="RUNNING")
            if TAG_ERROR in run.data.tags:
                self._call("delete_tag", run_id, TAG_ERROR)
            tags[TAG_ATTEMPTS] = str(int(run.data.tags.get(TAG_ATTEMPTS, "1")) + 1)
            self.set_tags(run_id, tags)
            # Logged params cannot change; settings outside the config hash (e.g. ray.address) may
            # differ on a resubmission, and the first attempt's values stay.
            params = {key: value for key, value in cfg.flat().items() if key not in run.data.params}
            self.log_params(run_id, params)
            return StageRun(self, run_id, resumed=True)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tags[TAG_ATTEMPTS] = "1"
        run = self._call("create_run", self.experiment_id, tags=tags, run_name=run_name)
        self.log_params(run.info.run_id, cfg.flat())
        return StageRun(self, run.info.run_id, resumed=False)

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        """End a run; `error` (for FAILED/KILLED runs) is kept in the `limpq.error` tag."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish: status must be FINISHED, FAILED or KILLED, not {status!r}")
        if error:
            self.set_tags(run_id, {TAG_ERROR: error})
        self._call("set_terminated", run_id, status=status)

    # ------------------------------------------------------------------------------ logging

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Values are stringified (JSON for non-strings); one call per MLflow batch of 100, so a
        lock retry never repeats a batch that was written."""
        entries = [Param(key, _param_value(value)) for key, value in params.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._call("log_batch", run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._call("log_batch", run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._call("log_batch", run_id, tags=chunk)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run_id, str(local_path), artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", run_id, str(local_dir), artifact_path)

    def log_dict(self, run_id: str, data: Mapping[str, Any] | list, artifact_file: str) -> None:
        """JSON or YAML, chosen by the file extension."""
        self._call("log_dict", run_id, data, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call("log_text", run_id, text, artifact_file)

    def download_artifact(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Copy the run's artifact file or folder `path` under `dst`; returns the local path."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self._call("download_artifacts", run_id, path, str(dst)))

    def get_run(self, run_id: str) -> Run:
        return self._call("get_run", run_id)

    def ui_command(self) -> str:
        """The command that opens the MLflow UI on this store."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri '{self.tracking_uri}'"


@lru_cache(maxsize=None)
def _experiment_id(tracker: Tracker) -> str:
    experiment = tracker._call("get_experiment_by_name", tracker.experiment)
    if experiment is None:
        try:
            return tracker._call("create_experiment", tracker.experiment, tracker._artifact_location())
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = tracker._call("get_experiment_by_name", tracker.experiment)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"mlflow.experiment: experiment {tracker.experiment!r} is deleted in {tracker.tracking_uri}; "
            "restore it (mlflow experiments restore) or choose another name"
        )
    return experiment.experiment_id


@dataclass(frozen=True)
class StageRun:
    """An open stage run. As a context manager it finishes the run: FINISHED on success, FAILED
    (with the error) on an exception, KILLED on an interrupt."""

    tracker: Tracker
    run_id: str
    resumed: bool

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> None:
        if exc is None:
            self.tracker.finish(self.run_id)
        else:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            self.tracker.finish(self.run_id, status, error=f"{type(exc).__name__}: {exc}")
