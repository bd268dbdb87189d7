#!/usr/bin/env bash
# The README's picture of a sweep in the MLflow UI, taken from a real run's store: serves it with
# `mlflow server` on 127.0.0.1, opens the experiment's runs table in headless Chromium (installed with
# apt-get when missing and run as root), expands the run tree and writes docs/mlflow-sweep.png.
#   docs/screenshot.sh [TRACKING_URI] [EXPERIMENT]      defaults: `make demo`'s sqlite:///mlflow.db, limpq-demo
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" tests/mlflow_browser.py --tracking-uri "${1:-sqlite:///mlflow.db}" \
    --experiment "${2:-limpq-demo}" --out docs/mlflow-sweep.png
