"""Every private Ray and MLflow API this project uses, in one place, and the versions it was tested
with. Each function names the public gap it fills; when Ray or MLflow change, this module (and
ray_data_logging.yaml, which names Ray Data's internal logging classes) is what to check.

`check_versions()` runs when the pipeline starts Ray or joins a cluster: a Ray or MLflow other than
the tested one is reported as a warning (the run goes on) that says what to do. requirements.lock
pins the tested versions, and `make install` installs them.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import ray
from mlflow.store.artifact.utils.models import _parse_model_id_if_present
from ray._private import ray_constants
from ray._private.state import state
from ray.experimental.internal_kv import _internal_kv_get

log = logging.getLogger("limpq")

TESTED = {"ray": "2.60.0", "mlflow": "3.17.2"}


def check_versions() -> list[str]:
    """Warnings (also logged) for each of Ray and MLflow that is not the tested version."""
    warnings = []
    for package, tested in TESTED.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        if installed != tested:
            warnings.append(f"{package} {installed} is installed; limpq was tested with {tested} and uses some of its "
                            "private APIs (orchestrator/compat.py): install requirements.lock "
                            "(`make install`) or run `make test` against this version before trusting a run")
    for warning in warnings:
        log.warning(warning)
    return warnings


def autoscaler_maximum() -> dict[str, float] | None:
    """The most resources an autoscaler v2 cluster may grow to (its node types' maximum counts), or
    None. Ray publishes this only through its state accessor (Ray Train reads it the same way)."""
    maximum = state.get_max_resources_from_cluster_config()
    return {key: float(value) for key, value in maximum.items()} if maximum else None


def autoscaler_node_types() -> dict[str, str]:
    """node id -> node type from the v1 monitor's last report (`ray status` reads the same key)."""
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    return (report or {}).get("node_type_mapping") or {}


def reload_ray_auth_mode() -> None:
    """Ray's client reads RAY_AUTH_MODE once, when `ray` loads; after setting the variable in a process
    that already imported Ray, this makes it read it again."""
    from ray._raylet import (
        Config,  # the compiled core: only `limpq submit` with a token needs it
    )

    Config.initialize("")


def train_report_logger_name() -> str:
    """The logger of Ray Train's per-report INFO line, named after its source file rather than under
    "ray.train", where RunConfig's logging_config would reach it."""
    return str(Path(ray.__file__).parent / "train/v2/_internal/execution/context.py")


def logged_model_id(model_uri: str) -> str | None:
    """The logged model id of a `models:/<id>` URI: a tracking server accepts a model version whose
    source is a logged model only when the version names that id (MLflow's client does not add it)."""
    return _parse_model_id_if_present(model_uri)


def dataset_input_entity(dataset):
    """The MLflow entity of a dataset, as `mlflow.log_input` builds it; the client API that writes
    inputs to a given run (`MlflowClient.log_inputs`) takes entities only."""
    return dataset._to_mlflow_entity()
