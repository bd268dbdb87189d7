"""Every private Ray and MLflow API this project uses, in one place, and the versions it was tested
with. Each function names the public gap it fills; when Ray or MLflow change, this module is what to
check, together with the one place that cannot live here: `orchestrator/distributed/ray_data_logging.yaml`,
a logging configuration Ray Data reads itself (through RAY_DATA_LOGGING_CONFIG), which names Ray
Data's internal logging classes.

The MLflow helpers serve tracking/ (MLflow work), which must not load Ray for them: Ray's internals
are imported inside the functions that use them, so importing this module loads MLflow only.

`check_versions()` runs when the pipeline starts Ray or joins a cluster: a Ray or MLflow other than
the tested one is reported as a warning (the run goes on) that says what to do. requirements.lock
pins the tested versions, and `make install` installs them.
"""

from __future__ import annotations

import json
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset
from mlflow.store.artifact.utils.models import _parse_model_id_if_present
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking.context.registry import resolve_tags

# MLflow's reserved tag names and value limits: its client takes and enforces them, but they are
# exported only from its internal modules (re-exported here for tracking/).
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT as MLFLOW_DATASET_CONTEXT
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID as MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as MAX_PARAM_VAL_LENGTH
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as MAX_TAG_VAL_LENGTH

log = logging.getLogger("limpq")

TESTED = {"ray": "2.60.0", "mlflow": "3.17.2"}

# MLflow registers its local-artifact dataset source twice, so resolving any local path warns that
# it is ambiguous between two identical classes: nothing for the user to act on.
_AMBIGUOUS_SOURCE_WARNING = "The specified dataset source can be interpreted in multiple ways"


def check_versions() -> list[str]:
    """Warnings (also logged) for each of Ray and MLflow that is not the tested version."""
    found = []
    for package, tested in TESTED.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        if installed != tested:
            found.append(f"{package} {installed} is installed; limpq was tested with {tested} and uses some of its "
                         "private APIs (orchestrator/compat.py): install requirements.lock "
                         "(`make install`) or run `make test` against this version before trusting a run")
    for warning in found:
        log.warning(warning)
    return found


# ------------------------------------------------------------------------------------------- Ray
# Ray's internals are imported in these functions, not at the top: the MLflow helpers below serve
# tracking/, which must not load Ray for them.


def autoscaler_maximum() -> dict[str, float] | None:
    """The most resources an autoscaler v2 cluster may grow to (its node types' maximum counts), or
    None. Ray publishes this only through its state accessor (Ray Train reads it the same way)."""
    from ray._private.state import state  # Ray-only (see above)

    maximum = state.get_max_resources_from_cluster_config()
    return {key: float(value) for key, value in maximum.items()} if maximum else None


def autoscaler_node_types() -> dict[str, str]:
    """node id -> node type from the v1 monitor's last report (`ray status` reads the same key)."""
    from ray._private import ray_constants  # Ray-only (see above)
    from ray.experimental.internal_kv import _internal_kv_get

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
    import ray  # Ray-only (see above)

    return str(Path(ray.__file__).parent / "train/v2/_internal/execution/context.py")


# ---------------------------------------------------------------------------------------- MLflow


def logged_model_id(model_uri: str) -> str | None:
    """The logged model id of a `models:/<id>` URI: a tracking server accepts a model version whose
    source is a logged model only when the version names that id (MLflow's client does not add it)."""
    return _parse_model_id_if_present(model_uri)


def dataset_entity(source_uri: str, name: str, digest: str) -> Dataset:
    """The MLflow entity of a dataset at `source_uri`, as `mlflow.log_input` builds it: the client API
    that writes inputs to a given run (`MlflowClient.log_inputs`) takes entities only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_AMBIGUOUS_SOURCE_WARNING)
        source = resolve_dataset_source(source_uri)
    return MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()


def mlflow_context_tags() -> dict[str, Any]:
    """MLflow's standard run tags (user, source, git commit) as the fluent API sets them on
    `mlflow.start_run`; the client's `create_run` adds none."""
    return resolve_tags()


def system_metrics_monitor(run_id: str, sampling_interval: float, samples_before_logging: int):
    """MLflow's monitor of CPU, memory and GPU use, logging into `run_id`; the public switch
    (`mlflow.start_run(log_system_metrics=True)`) needs the fluent active run, which a Train worker
    writing a run by id does not have."""
    return SystemMetricsMonitor(run_id, sampling_interval=sampling_interval,
                                samples_before_logging=samples_before_logging)
