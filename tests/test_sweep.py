"""The whole pipeline with its budget sweep on real Ray Tune + Ray Train + MLflow (CPU, tiny data):
one run tree, logged and registered models, honest status of failed trials, resubmission."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from faults import fail_once

from orchestrator.config import PipelineConfig
from orchestrator.distributed.pipeline import run_pipeline
from orchestrator.distributed.sweep import registered_model_name
from orchestrator.errors import PipelineFailed
from orchestrator.modelinfo import build_model
from orchestrator.tracking import Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.quant.surgery import quantize_model

pytestmark = pytest.mark.timeout(2400)  # in CI: the end-to-end test of the pipeline


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    ray.shutdown()


def _config(tmp_path: Path, data: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "sweep", "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(data), "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
        "fp": {"epochs": 1, "train_fraction": 1.0},
        "indicators": {"bits": [4, 3, 2], "epochs": 1, "train_fraction": 1.0},
        "search": {"budgets": [{"target_wbits": 3, "target_abits": 3}, {"bitops_g": 0.001}]},
        "finetune": {"epochs": 1, "train_fraction": 1.0, "baselines": [3]},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "max_failures": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-sweep"},
    })


def test_sweep_run_tree_models_failures_and_resubmission(tmp_path: Path, digits_slice: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, digits_slice)
    marker = tmp_path / "failed-once"
    # trial W3A3 raises once, after opening its run; the local Ray the pipeline starts passes PYTHONPATH on
    monkeypatch.setenv("PYTHONPATH", fail_once(tmp_path / "faults", "orchestrator.distributed.sweep",
                                               "_policy_metrics", "args[0]['label'] == 'W3A3'", marker))

    with pytest.raises(PipelineFailed, match="1 of 3 trials did not finish \\(G0.001\\)"):
        run_pipeline(cfg)

    assert marker.exists(), "the fault was not injected"
    printed = capsys.readouterr().out
    assert "FAILED G0.001: InfeasibleError: BitOps budget 0.001 G is below the minimum" in printed
    tracker = Tracker.from_config(cfg)
    client = tracker.client
    runs = client.search_runs([tracker.experiment_id], "")
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["limpq.stage"], []).append(run)
    [root] = by_stage["pipeline"]
    [fp] = by_stage["fp"]
    [indicators] = by_stage["indicators"]
    [sweep] = by_stage["sweep"]
    trials = {run.info.run_name: run for run in by_stage["trial"]}

    # one tree: root -> stages -> trials; a failed trial leaves the sweep and the root FAILED
    assert root.info.run_name.startswith("sweep-") and root.info.status == "FAILED"
    for run in (fp, indicators, sweep):
        assert run.data.tags["mlflow.parentRunId"] == root.info.run_id
        assert run.data.tags["limpq.root_run_id"] == root.info.run_id
    assert fp.info.status == indicators.info.status == "FINISHED"
    assert sweep.info.status == "FAILED" and "G0.001" in sweep.data.tags["limpq.error"]
    assert set(trials) == {"W3A3", "G0.001", "uniform-W3A3"}
    assert all(run.data.tags["mlflow.parentRunId"] == sweep.info.run_id for run in trials.values())
    assert trials["W3A3"].info.status == "FINISHED" and trials["W3A3"].data.tags["limpq.attempts"] == "2"
    assert trials["G0.001"].info.status == "FAILED"
    assert "below the minimum" in trials["G0.001"].data.tags["limpq.error"]
    for run in runs:  # standard tags a user expects
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
        assert run.data.tags.get("mlflow.note.content")
    assert root.data.tags.get("mlflow.source.git.commit") or not (Path(__file__).parents[1] / ".git").exists()
    # resource settings are tags (they may change between submissions), not params
    assert "ray.num_workers" not in fp.data.params and fp.data.tags["limpq.ray.num_workers"] == "1"

    # dataset lineage on every training run
    for run in (fp, indicators, trials["W3A3"], trials["uniform-W3A3"]):
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        contexts = {tag.value for item in inputs for tag in item.tags if tag.key == "mlflow.data.context"}
        assert contexts == {"training", "validation"}, run.info.run_name

    # comparable trial metrics; the sweep holds the summary, not one metric per budget
    for label in ("W3A3", "uniform-W3A3"):
        assert {"val_top1", "bitops_g", "size_mb", "epoch"} <= set(trials[label].data.metrics)
    assert not [key for key in sweep.data.metrics if key.startswith("top1_")]
    sweep_artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"summary.csv", "summary.parquet", "summary_table.json", "report.txt", "plots"} <= sweep_artifacts

    # models: FP and joint logged; one registered version per finished trial, with tags and aliases
    name = registered_model_name(cfg)
    versions = {v.tags["budget"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"W3A3", "uniform-W3A3"}
    assert {"budget", "bitops_g", "size_mb", "compression_ratio", "top1"} <= set(versions["W3A3"].tags)
    model = client.get_registered_model(name)
    assert set(model.aliases) == {"best-top1", "budget-w3a3", "budget-uniform-w3a3"}
    assert client.get_model_version_by_alias(name, "budget-w3a3").run_id == trials["W3A3"].info.run_id
    # and each one's ONNX export, checked in ONNX Runtime, as a version of <name>-onnx with the same aliases
    onnx_versions = {v.tags["budget"]: v for v in client.search_model_versions(f"name = '{name}-onnx'")}
    assert set(onnx_versions) == {"W3A3", "uniform-W3A3"}
    assert set(client.get_registered_model(f"{name}-onnx").aliases) == set(model.aliases)
    assert all(trials[label].data.metrics["onnx_agreement"] >= 0.999 for label in onnx_versions)

    # loading a registered version in a fresh process gives the trial checkpoint's logits
    checkpoint = tracker.download_artifact(trials["W3A3"].info.run_id, "checkpoint/finetuned.pt", tmp_path / "ckpt")
    payload = load_checkpoint(checkpoint)
    reference = build_model("resnet18", 10)
    policy = {layer["name"]: (layer["wbits"], layer["abits"]) for layer in payload["meta"]["policy"]["layers"]}
    quantize_model(reference, policy=policy, input_size=16)
    restore_model(reference, payload["model"], checkpoint)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(images)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch, mlflow\n"
        f"mlflow.set_tracking_uri({cfg.mlflow.tracking_uri!r})\n"
        f"model = mlflow.pytorch.load_model('models:/{name}@budget-w3a3').eval()\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)\n"
        f"torch.save(model(images).detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=clean_env)
    assert torch.allclose(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5)

    # resubmission: only the failed trial runs again (it fails again, deterministically, without
    # training); nothing new is trained or registered
    run_count, version_count = len(runs), len(versions)
    with pytest.raises(PipelineFailed):
        run_pipeline(cfg)
    assert len(client.search_runs([tracker.experiment_id], "")) == run_count
    assert len(client.search_model_versions(f"name = '{name}'")) == version_count
    assert len(client.search_model_versions(f"name = '{name}-onnx'")) == version_count
    trials_after = {run.info.run_name: run for run in client.search_runs(
        [tracker.experiment_id], "tags.`limpq.stage` = 'trial'")}
    assert trials_after["G0.001"].data.tags["limpq.attempts"] == "2"
    assert trials_after["W3A3"].data.tags["limpq.attempts"] == "2"  # reused, not rerun
    summary = json.loads(Path(client.download_artifacts(sweep.info.run_id, "summary_table.json", str(tmp_path)))
                         .read_text())
    assert set(summary["columns"]) >= {"budget", "top1", "bitops_g", "status", "error"}
