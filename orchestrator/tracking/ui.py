"""What the MLflow UI shows first for our experiments.

MLflow's UI has a global switch, GenAI / Model training, that decides an experiment's pages; it
starts on GenAI (an Overview of traces and token usage, empty for us) unless the URL carries
`workflowType=machine_learning` or the browser kept the user's last choice. So the link we print
carries it. The experiment is also tagged with the kind MLflow 3 uses for model training
(`mlflow.experimentKind` = `custom_model_development`, the UI's ExperimentKind in mlflow/server/js;
the Python package has no constant for it): the header's kind selector shows it, and UIs that do
read the tag open on runs.
"""

from __future__ import annotations

from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
MODEL_TRAINING_QUERY = "workflowType=machine_learning"


def mark_model_development(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training; `client` is an MlflowClient."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)


def experiment_page(ui_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI served at `ui_url` (e.g. http://127.0.0.1:5000)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING_QUERY}"
