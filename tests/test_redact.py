"""Credentials never reach params, tags or printed commands (issue 9.5)."""

from __future__ import annotations

import pytest

from orchestrator.common.redact import redact, redact_params


@pytest.mark.parametrize("text, expected", [
    ("postgresql://alice:s3cret@db.example:5432/mlflow", "postgresql://alice:***@db.example:5432/mlflow"),
    ("mysql+pymysql://bob:p@ss:w0rd@db/mlflow", "mysql+pymysql://bob:***@db/mlflow"),  # "@" and ":" in it
    ("http://user:pw@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("https://mlflow.example/api?token=abc123&experiment=limpq", "https://mlflow.example/api?token=***&experiment=limpq"),
    ("s3://bucket/key?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff00", "s3://bucket/key?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=AbC%3D", "https://acct.blob.core.windows.net/c?sv=2022&sig=***"),
    ("mlflow ui --backend-store-uri postgresql://a:b@h/db --port 5000", "mlflow ui --backend-store-uri postgresql://a:***@h/db --port 5000"),
    ("https://ghp_T0ken@mlflow.example/", "https://***@mlflow.example/"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2 limpq run --config x.yaml", "MLFLOW_TRACKING_PASSWORD=*** limpq run --config x.yaml"),
    ("--set mlflow.tracking_uri=http://u:secret@host:5000", "--set mlflow.tracking_uri=http://u:***@host:5000"),
])
def test_redact_hides_the_secret_and_keeps_the_rest(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "sqlite:////tmp/runs/mlflow.db", "http://127.0.0.1:5000", "http://host:8080/path?x=a@b", "s3://bucket/data/train",
"indicators.epochs=3 search.cost_model=exact fp.checkpoint=/tmp/fp.pt",
])
def test_redact_leaves_plain_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_params() -> None:
    params = {"mlflow.tracking_uri": "postgresql://u:pw@db/m", "env.aws_secret_access_key": "xyz",
              "auth.token": "t0k", "seed": 0, "fp.checkpoint": None, "data.path": "s3://b/d"}
    assert redact_params(params) == {"mlflow.tracking_uri": "postgresql://u:***@db/m", "env.aws_secret_access_key": "***",
                                     "auth.token": "***", "seed": 0, "fp.checkpoint": None, "data.path": "s3://b/d"}
    assert params["mlflow.tracking_uri"] == "postgresql://u:pw@db/m"  # a copy
