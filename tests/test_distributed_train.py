"""Joint indicator training on real Ray Train (CPU, gloo) with a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
from faults import fail_once
from pipelines import tiny_config

from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.run import run_indicators
from orchestrator.search.indicators import load_indicators
from orchestrator.checks.preflight import preflight
from orchestrator.tracking.runs import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(digits_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits slice plus two unreadable files."""
    root = tmp_path_factory.mktemp("corrupt") / "digits"
    shutil.copytree(digits_slice, root)
    (root / "train" / "3" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "train" / "5" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    ray.shutdown()


def _config(tmp_path: Path, data: Path, **sections) -> PipelineConfig:
    return tiny_config(tmp_path, data, "ddp", **{
        "indicators": {"epochs": 2, "lr": 0.02}, "ray": {"num_workers": 2, "max_failures": 2},
        "mlflow": {"experiment": "test-ddp"}, **sections})


def test_two_workers_survive_a_killed_worker_and_skip_corrupt_images(tmp_path: Path, digits: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, digits)
    marker = tmp_path / "crashed-once"
    # rank 0's process exits at its 4th step, mid-epoch 2 (80 images, 2 workers x 16: 2 steps per epoch),
    # on the first attempt only; Ray's workers inherit PYTHONPATH from the local Ray started here
    monkeypatch.setenv("PYTHONPATH", fail_once(
        tmp_path / "faults", "orchestrator.distributed.train", "_every_worker_has_batch",
        "calls == 4 and __import__('ray').train.get_context().get_world_rank() == 0", marker, action="exit"))
    ray.init(address="local", num_cpus=4, include_dashboard=False)

    out = run_indicators(preflight(cfg, sweep=False))

    assert marker.exists(), "the fault was not injected"
    document = json.loads(out.read_text())
    assert document["format"] == "limpq-indicators/v1" and document["bits"] == [4, 2]
    indicators = load_indicators(out)
    assert len(indicators.layers) == 19 and indicators.provenance["epochs"] == 2

    tracker = Tracker.from_config(cfg)
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
    assert [run.info.status for run in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.params["indicators.bits"] == "[4, 2]" and run.data.tags["limpq.ray.num_workers"] == "2"
    for key in ("loss_w4", "top1_w2", "loss_random", "top1_random", "val_top1_w4", "images_per_second"):
        assert key in run.data.metrics, key
    epochs = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss_w2")]
    assert sorted(set(epochs)) == [1, 2]  # epoch 2 resumed from the epoch-1 checkpoint
    assert run.data.metrics["skipped_images_train"] == 2
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
    assert {"indicators.json", "plots", "checkpoint"} <= artifacts
    assert {a.path for a in tracker.client.list_artifacts(run.info.run_id, "plots")} == {"plots/indicators.png"}


def test_rerun_skips_finished_stages(tmp_path: Path, digits: Path) -> None:
    cfg = _config(tmp_path, digits, indicators={"epochs": 1, "lr": 0.02}, ray={"num_workers": 1})
    first = run_indicators(preflight(cfg, sweep=False)).read_text()
    shutil.rmtree(cfg.run_dir)  # outputs come back from MLflow, not from a second training
    assert run_indicators(preflight(cfg, sweep=False)).read_text() == first
    tracker = Tracker.from_config(cfg)
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
    assert len(runs) == 1


def test_a_stage_whose_mlflow_run_was_deleted_trains_again_from_the_start(tmp_path: Path, digits: Path) -> None:
    """Ray Train's checkpoints belong to the MLflow run: after its run is deleted in the MLflow UI, the
    stage trains every epoch again in a new run (it used to resume from the old run's final checkpoint,
    train nothing and log no epoch)."""
    cfg = _config(tmp_path, digits, indicators={"epochs": 1, "lr": 0.02}, ray={"num_workers": 1})
    run_indicators(preflight(cfg, sweep=False))
    tracker = Tracker.from_config(cfg)
    [first] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
    tracker.client.delete_run(first.info.run_id)
    run_indicators(preflight(cfg, sweep=False))
    [second] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
    assert second.info.run_id != first.info.run_id and second.info.status == "FINISHED"
    assert [m.step for m in tracker.client.get_metric_history(second.info.run_id, "epoch")] == [1]


@pytest.mark.timeout(1800)  # two indicator stages
def test_a_resumed_run_reads_and_learns_what_an_uninterrupted_one_does(tmp_path: Path, digits_slice: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker, two indicator epochs: a run whose worker dies at the second step of epoch 2 and that
    resumes from the epoch-1 checkpoint reads epoch 2's batches as an uninterrupted run does (the same
    order and crops, not epoch 1's again), so its epoch-2 losses and final weights are the same."""
    import torch

    from orchestrator.train.checkpoint import load_checkpoint

    marker = tmp_path / "crashed-once"
    # 80 images in batches of 16: 5 steps an epoch, so the 7th call is epoch 2's second step (first run only)
    monkeypatch.setenv("PYTHONPATH", fail_once(tmp_path / "faults", "orchestrator.distributed.train",
                                               "_every_worker_has_batch", "calls == 7", marker, action="exit"))
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    runs = {}
    for name in ("resumed", "uninterrupted"):  # the fault fires once, in the first
        cfg = _config(tmp_path / name, digits_slice, indicators={"epochs": 2, "lr": 0.005},
                      ray={"num_workers": 1, "max_failures": 1})
        runs[name] = (cfg, run_indicators(preflight(cfg, sweep=False)))
    assert marker.exists(), "the fault was not injected"
    (resumed_cfg, resumed_out), (straight_cfg, straight_out) = runs["resumed"], runs["uninterrupted"]
    resumed_state = load_checkpoint(resumed_out.parent / "joint.pt")["model"]
    straight_state = load_checkpoint(straight_out.parent / "joint.pt")["model"]
    assert resumed_state.keys() == straight_state.keys()
    assert all(torch.equal(resumed_state[key], straight_state[key]) for key in straight_state)

    def losses(cfg: PipelineConfig) -> dict[int, float]:
        tracker = Tracker.from_config(cfg)
        [run] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
        return {m.step: m.value for m in tracker.client.get_metric_history(run.info.run_id, "loss_w4")}

    assert losses(resumed_cfg) == losses(straight_cfg) and set(losses(straight_cfg)) == {1, 2}
