"""Models as MLflow models: logged into a stage or trial run, registered as versions with tags and
aliases (one registered model per pipeline and architecture), looked up by run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.models import infer_signature

import orchestrator
from orchestrator.config.schema import PipelineConfig
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


@dataclass(frozen=True)
class ModelRecord:
    """How a trial's model is recorded: logged at `step` of its run, registered as a new version of
    `name` with `tags`, and `aliases` moved to that version."""

    name: str
    tags: Mapping[str, str]
    aliases: tuple[str, ...]
    step: int


def registered_model_name(cfg: PipelineConfig) -> str:
    """The registered model holding a pipeline's trial models (one per pipeline and architecture)."""
    return f"{cfg.name}-{cfg.model.arch.replace(':', '.')}"  # MLflow refuses ':' (a user's module:callable)


def register_model(tracker: Tracker, name: str, model_uri: str, run_id: str, tags: Mapping[str, Any],
                   aliases: Sequence[str]) -> str:
    """A new version of registered model `name` (created if missing) with `aliases` moved to it;
    returns the version."""
    version = tracker.register_version(name, model_uri, run_id, tags, REGISTERED_MODEL_DESCRIPTION)
    for alias in aliases:
        tracker.set_model_alias(name, alias, version)
    return version
