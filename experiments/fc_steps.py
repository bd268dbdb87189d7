"""The learned step size of the fixed 8-bit classifier's weights (`fc.weight_quant.step.8`) in every
fine-tuned trial checkpoint of an MLflow store: a step that SGD took below the clamp's 1e-5 floor is
frozen there (zero gradient, docs/method.md §2.1), the classifier's weights all become +-127e-5 and the
logits flat. docs/results.md ("Why fine-tuning collapses") counts them.

    .venv/bin/python experiments/fc_steps.py sqlite:///mlflow.db
"""

from __future__ import annotations

import sys
import tempfile

import mlflow
import torch

from orchestrator.quant.lsq import STEP_MIN

STEP_KEY = "fc.weight_quant.step.8"


def main(tracking_uri: str) -> int:
    client = mlflow.MlflowClient(tracking_uri)
    collapsed = total = 0
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'trial'"):
            with tempfile.TemporaryDirectory() as directory:
                try:
                    path = client.download_artifacts(run.info.run_id, "checkpoint/finetuned.pt", directory)
                except mlflow.exceptions.MlflowException:
                    continue  # a one-shot trial: no fine-tuning
                state = torch.load(path, weights_only=True)["model"]
            if STEP_KEY not in state:
                continue
            step = float(state[STEP_KEY])
            total += 1
            collapsed += step < STEP_MIN
            top1 = run.data.metrics.get("val_top1")
            print(f"{experiment.name:14s} {run.info.run_name:28s} fc step {step:+.5f}  val top-1 "
                  f"{'-' if top1 is None else f'{100 * top1:.2f}'}{'  frozen below the floor' if step < STEP_MIN else ''}")
    print(f"{collapsed} of {total} fine-tuned trials have their classifier's weight step below {STEP_MIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
