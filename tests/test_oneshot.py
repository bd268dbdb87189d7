"""One-shot policy scoring with the joint model (docs/method.md §9) and `limpq evaluate` on the smoke pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import ray
import torch
from pipelines import write_smoke_config
from torch import nn

from orchestrator.cli import main
from orchestrator.common.errors import UserError
from orchestrator.models.info import trace_layers
from orchestrator.quant.policy import random_policy, set_policy
from orchestrator.quant.surgery import quantize_model
from orchestrator.search.costs import costs_from_layers
from orchestrator.search.policy import policy_totals
from orchestrator.train.oneshot import check_policy, policy_cost, score_policy
from orchestrator.train.steps import evaluate


def _joint_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    quantize_model(model, bits=[4, 2], input_size=10)
    model.train()
    for policy in ({"3": (4, 4), "6": (4, 4)}, {"3": (2, 2), "6": (2, 2)}):  # initialise step sizes and BN copies
        set_policy(model, policy)
        for _ in range(3):
            model(torch.randn(16, 3, 10, 10))
    return model.eval()


def _batches(seed: int, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 10, 10, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def test_score_matches_evaluate_at_the_policy_and_recalibration_leaves_the_model_as_it_was() -> None:
    model = _joint_model()
    val = _batches(0)
    mixed = {"3": (4, 2), "6": (2, 4)}
    expected = evaluate(model, val, nn.CrossEntropyLoss(), mixed)
    score = score_policy(model, mixed, val)
    assert score == {"top1": expected["top1"], "loss": pytest.approx(expected["loss"]), "samples": 24}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrated = score_policy(model, mixed, val, calibration_batches=_batches(1))
    assert recalibrated["loss"] != pytest.approx(score["loss"])  # the statistics it used were others
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert score_policy(model, mixed, val) == score


def test_policy_that_does_not_fit_is_one_user_error() -> None:
    model = _joint_model()
    with pytest.raises(UserError, match=r"^p.json: layers do not match the model's 2 searchable layers: missing 6; "
                                        r"unknown conv9$"):
        check_policy(model, {"3": (4, 4), "conv9": (4, 4)}, "p.json")
    with pytest.raises(UserError, match=r"^p.json: layer 6 asks for W8A2; the joint model has step sizes for bits 4, 2"):
        check_policy(model, {"3": (4, 4), "6": (8, 2)}, "p.json")


def test_policy_cost_is_the_search_accounting() -> None:
    model = _joint_model()
    costs = costs_from_layers(trace_layers(nn.Sequential(*[m for m in model]), 10))
    policy = random_policy(model, [4, 2], random.Random(3))
    policy["3"] = (2, 4)
    totals = policy_cost(costs, policy)
    assert totals == policy_totals(costs, [2, policy["6"][0]], [4, policy["6"][1]])


# --- `limpq evaluate` on the smoke pipeline ------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_pipeline(digits_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke indicator stage (indicators 1 epoch on the digits slice, from an untrained FP
    model to save a Ray Train run: the comparison holds for any weights); returns the config file."""
    from orchestrator.config.loading import load_config
    from orchestrator.distributed.run import run_indicators
    from orchestrator.checks.preflight import preflight

    config = write_smoke_config(digits_slice, tmp_path_factory.mktemp("evaluate"), fp={"epochs": 0})
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # never join a `ray start` cluster
    try:
        run_indicators(preflight(load_config(config)))
        yield config
    finally:
        ray.shutdown()


def _final_metric(config: Path, key: str) -> float:
    from orchestrator.config.loading import load_config
    from orchestrator.data.layout import index_dataset
    from orchestrator.tracking.stages import finished_stage
    from orchestrator.checks.stage_keys import stage_keys
    from orchestrator.tracking.runs import Tracker

    cfg = load_config(config).with_absolute_paths()
    tracker = Tracker.from_config(cfg)
    stage_key = stage_keys(cfg, index_dataset(cfg.data).fingerprint).indicators
    run_id = finished_stage(cfg, tracker, "indicators", stage_key).run_id
    history = tracker.client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step).value


@pytest.mark.slow
def test_evaluate_uniform_equals_the_joint_models_val_metric(smoke_pipeline: Path, capsys, tmp_path: Path) -> None:
    policy_file = tmp_path / "w3.json"
    [indicators] = (smoke_pipeline.parent / "runs/smoke").glob("*/indicators.json")  # runs/<name>/<run id>/
    code = main(["search", "--indicators", str(indicators),
                 "--input-size", "16", "--num-classes", "10", "--target-wbits", "3", "--target-abits", "3",
                 "--output", str(policy_file)])
    assert code == 0
    capsys.readouterr()

    # joint training's own BN statistics (no recalibration), as its val metric used
    assert main(["evaluate", "--config", str(smoke_pipeline), "--uniform", "4", "2", "--recalibrate-batches", "0",
                 "--policy", str(policy_file), "--json"]) == 0  # Ray is up: scored as a Ray task

    rows = json.loads(capsys.readouterr().out)
    assert [row["policy"] for row in rows] == ["uniform-W4A4", "uniform-W2A2", str(policy_file)]
    assert all(set(row) == {"policy", "bitops_g", "size_mb", "top1", "samples"} for row in rows)
    assert all(row["samples"] == 40 for row in rows)
    for row, bits in zip(rows, (4, 2)):  # same val data, same BN copy as indicator training's val metric
        assert row["top1"] == pytest.approx(_final_metric(smoke_pipeline, f"val_top1_w{bits}"), abs=1e-9)
    searched = json.loads(policy_file.read_text())
    assert rows[2]["bitops_g"] == pytest.approx(searched["bitops_g"])
    assert rows[2]["size_mb"] == pytest.approx(searched["size_mb"])
    assert rows[1]["bitops_g"] < rows[2]["bitops_g"] < rows[0]["bitops_g"]


@pytest.mark.slow
def test_evaluate_refuses_a_policy_that_does_not_fit(smoke_pipeline: Path, capsys, tmp_path: Path) -> None:
    from orchestrator.config.loading import load_config
    from orchestrator.search.costs import cost_table
    from orchestrator.search.policy import uniform_baseline

    cfg = load_config(smoke_pipeline)
    document = uniform_baseline(cost_table(cfg.model.arch, cfg.model.input_size, num_classes=10), 3).to_dict()
    document["layers"][0]["name"] = "layer9.conv"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))

    assert main(["evaluate", "--config", str(smoke_pipeline), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: layers do not match" in err and "layer9.conv" in err
    assert main(["evaluate", "--config", str(smoke_pipeline), "--uniform", "8"]) == 2
    assert "uniform-W8A8: layer layer1.0.conv1 asks for W8A8" in capsys.readouterr().err
