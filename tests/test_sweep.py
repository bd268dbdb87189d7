"""The whole pipeline with its budget sweep on real Ray Tune + Ray Train + MLflow (CPU, tiny data),
run once (one trial fails once and Tune retries it) and submitted again: the session's `sweep`
(pipelines.py; the MLflow UI test reads it too). Each test checks one behaviour of what that left:
the run tree, trial metrics and the summary, registered models, a model loaded in a fresh process,
and that a finished pipeline submitted again runs nothing. (A trial that fails past its retries, and
the resubmission that reruns just it: test_resubmission.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipelines import Sweep

from orchestrator.tracking.models import registered_model_name
from orchestrator.models.info import build_model
from orchestrator.quant.deployed import deploy
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.checkpoint import load_checkpoint, restore_model

pytestmark = pytest.mark.timeout(2400)  # in CI: the end-to-end test of the pipeline


def test_a_trial_that_failed_once_is_retried_in_its_run_and_every_trial_finishes(sweep: Sweep) -> None:
    assert [row["status"] for row in sweep.rows] == ["ok", "ok", "ok"]
    [root], [sweep_run] = sweep.by_stage["pipeline"], sweep.by_stage["sweep"]
    assert root.info.status == sweep_run.info.status == "FINISHED"
    assert sweep.trials["W3A3"].info.status == "FINISHED" and sweep.trials["W3A3"].data.tags["limpq.attempts"] == "2"
    for label in ("W3A3", "G0.1", "uniform-W3A3"):
        assert label in sweep.printed  # the report


def test_one_run_tree_with_standard_tags_and_dataset_lineage(sweep: Sweep) -> None:
    [root], [fp], [indicators], [sweep_run] = (sweep.by_stage[stage] for stage in
                                               ("pipeline", "fp", "indicators", "sweep"))
    assert root.info.run_name.startswith("sweep-")
    for run in (fp, indicators, sweep_run):
        assert run.data.tags["mlflow.parentRunId"] == root.info.run_id
        assert run.data.tags["limpq.root_run_id"] == root.info.run_id
    assert fp.info.status == indicators.info.status == "FINISHED"
    assert set(sweep.trials) == {"W3A3", "G0.1", "uniform-W3A3"}
    assert all(run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id for run in sweep.trials.values())
    for run in sweep.runs:  # standard tags a user expects
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
        assert run.data.tags.get("mlflow.note.content")
    assert root.data.tags.get("mlflow.source.git.commit") or not (Path(__file__).parents[1] / ".git").exists()
    # resource settings are tags (they may change between submissions), not params
    assert "ray.num_workers" not in fp.data.params and fp.data.tags["limpq.ray.num_workers"] == "1"
    for run in (fp, indicators, sweep.trials["W3A3"], sweep.trials["uniform-W3A3"]):
        inputs = sweep.client.get_run(run.info.run_id).inputs.dataset_inputs
        contexts = {tag.value for item in inputs for tag in item.tags if tag.key == "mlflow.data.context"}
        assert contexts == {"training", "validation"}, run.info.run_name


def test_trials_hold_comparable_metrics_and_the_sweep_the_summary(sweep: Sweep) -> None:
    for label in ("W3A3", "uniform-W3A3"):
        assert {"val_top1", "bitops_g", "size_mb", "epoch"} <= set(sweep.trials[label].data.metrics)
    [sweep_run] = sweep.by_stage["sweep"]
    assert not [key for key in sweep_run.data.metrics if key.startswith("top1_")]
    artifacts = {a.path for a in sweep.client.list_artifacts(sweep_run.info.run_id)}
    assert {"summary.csv", "summary.parquet", "summary_table.json", "report.txt", "plots"} <= artifacts
    summary = json.loads(Path(sweep.client.download_artifacts(sweep_run.info.run_id, "summary_table.json",
                                                              str(sweep.tmp_path))).read_text())
    assert set(summary["columns"]) >= {"budget", "top1", "bitops_g", "status", "error"}


def test_every_finished_trial_is_a_registered_version_with_tags_and_aliases(sweep: Sweep) -> None:
    name = registered_model_name(sweep.cfg)
    assert set(sweep.versions) == {"W3A3", "G0.1", "uniform-W3A3"}
    assert {"budget", "bitops_g", "size_mb", "compression_ratio", "top1"} <= set(sweep.versions["W3A3"].tags)
    assert set(sweep.client.get_registered_model(name).aliases) == {"best-top1", "budget-w3a3", "budget-g0-1",
                                                                    "budget-uniform-w3a3"}
    assert sweep.client.get_model_version_by_alias(name, "budget-w3a3").run_id == sweep.trials["W3A3"].info.run_id
    # and each one's ONNX export, checked in ONNX Runtime, as a version of <name>-onnx with the same aliases
    onnx_versions = {v.tags["budget"]: v for v in sweep.client.search_model_versions(f"name = '{name}-onnx'")}
    assert set(onnx_versions) == set(sweep.versions)
    assert set(sweep.client.get_registered_model(f"{name}-onnx").aliases) == \
        set(sweep.client.get_registered_model(name).aliases)
    assert all(sweep.trials[label].data.metrics["onnx_agreement"] >= 0.999 for label in onnx_versions)


def test_a_registered_version_loads_in_a_fresh_process_with_the_deployed_checkpoints_logits(sweep: Sweep) -> None:
    """The registered model is the trial's checkpoint as deployed (quant.deployed: what its fast ONNX file
    computes), and it loads in a process that never imported the tests."""
    tmp_path = sweep.tmp_path
    checkpoint = sweep.tracker.download_artifact(sweep.trials["W3A3"].info.run_id, "checkpoint/finetuned.pt",
                                                 tmp_path / "ckpt")
    payload = load_checkpoint(checkpoint)
    reference = build_model("resnet18", 10)
    policy = {layer["name"]: (layer["wbits"], layer["abits"]) for layer in payload["meta"]["policy"]["layers"]}
    quantize_model(reference, policy=policy, input_size=16)
    restore_model(reference, payload["model"], checkpoint)
    reference = deploy(reference, torch.zeros(1, 3, 16, 16), tmp_path / "fast.onnx").model
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(images)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch, mlflow\n"
        f"mlflow.set_tracking_uri({sweep.cfg.mlflow.tracking_uri!r})\n"
        f"model = mlflow.pytorch.load_model('models:/{registered_model_name(sweep.cfg)}@budget-w3a3').eval()\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)\n"
        f"torch.save(model(images).detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=clean_env)
    assert torch.allclose(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5)


def test_a_finished_pipeline_submitted_again_runs_and_registers_nothing(sweep: Sweep) -> None:
    assert "W3A3" in sweep.printed_again  # the stored report, printed again
    assert [row["budget"] for row in sweep.resubmitted] == [row["budget"] for row in sweep.rows]
    assert len(sweep.runs_after) == len(sweep.runs)
    assert len(sweep.versions_after) == len(sweep.versions)
    name = registered_model_name(sweep.cfg)
    assert len(sweep.client.search_model_versions(f"name = '{name}-onnx'")) == len(sweep.versions)
