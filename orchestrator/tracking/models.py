"""Models as MLflow models: logged into a stage or trial run, registered as versions with tags and
aliases (one registered model per pipeline and architecture), looked up by run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

import orchestrator
from orchestrator.compat import logged_model_id
from orchestrator.models.user_module import model_code_paths
from orchestrator.tracking.runs import Tracker

REGISTERED_MODEL_DESCRIPTION = ("LIMPQ mixed-precision models, one version per searched budget; tags give budget, "
                                "BitOps, size and top-1.")


def _not_the_pickle_format_warning(record: logging.LogRecord) -> bool:
    """`mlflow.pytorch` warns on every pickle-format save; pickle is our deliberate choice (see
    `log_model`), so the warning would be repeated noise in every trial's log stream."""
    return not record.getMessage().startswith("Saving pytorch model by Pickle")


logging.getLogger("mlflow.pytorch").addFilter(_not_the_pickle_format_warning)


def log_model(tracker: Tracker, run_id: str, model: torch.nn.Module, example: torch.Tensor, name: str = "model",
              step: int = 0, tags: Mapping[str, Any] | None = None) -> str:
    """`mlflow.pytorch.log_model` into `run_id` (an MLflow 3 LoggedModel, linked to the run's metrics at
    `step`) with a signature inferred from `example` (a CPU tensor batch) and this package (and a user's
    own model module) as code, so `mlflow.pytorch.load_model` works where neither is installed. Saved
    with MLflow's pickle format:
    the LSQ quantizers (a custom autograd function, lazily initialised step sizes) do not go through
    torch.export. Returns the model URI."""
    mlflow.set_tracking_uri(tracker.tracking_uri)
    # MLflow creates the LoggedModel in the fluent active experiment, not the run's: without this it
    # lands in experiment 0 (and its artifacts under ./mlruns of the working directory)
    mlflow.set_experiment(experiment_id=tracker.experiment_id)
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(example)
    info = mlflow.pytorch.log_model(
        model, name=name, run_id=run_id, signature=infer_signature(example.numpy(), output.numpy()),
        input_example=example.numpy(), code_paths=[str(Path(orchestrator.__file__).parent), *model_code_paths(model)],
        step=step,
        serialization_format="pickle", tags=dict(tags or {}),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri


def register_model(tracker: Tracker, name: str, model_uri: str, run_id: str, tags: Mapping[str, Any],
                   aliases: list[str]) -> str:
    """A new version of registered model `name` (created if missing); returns the version."""
    try:
        tracker.client.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # a tracking server rejects a `models:/<id>` source unless the version names that model id
    version = tracker.client.create_model_version(name, model_uri, run_id=run_id,
                                                  tags={key: str(value) for key, value in tags.items()},
                                                  model_id=logged_model_id(model_uri))
    for alias in aliases:
        tracker.client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def model_versions_of_run(tracker: Tracker, name: str, run_id: str) -> list[str]:
    """Versions of registered model `name` created from `run_id` (newest first)."""
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return [str(v.version) for v in sorted(versions, key=lambda v: -int(v.version))]
