"""`ray.compile: off` and `on` through the real indicator pipeline (Ray Train + MLflow, CPU, the
digits slice): both finish, the worker records what it did, and both learn the same indicators."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.pipeline import run_indicators
from orchestrator.indicators import load_indicators
from orchestrator.preflight import preflight
from orchestrator.tracking.runs import Tracker
from tests.pipelines import tiny_config

pytestmark = pytest.mark.timeout(2400)  # a cold inductor cache compiles resnet18's joint graph in minutes


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # never join a `ray start` cluster
    yield
    ray.shutdown()


def _config(tmp_path: Path, data: Path, mode: str) -> PipelineConfig:
    return tiny_config(tmp_path, data, f"compile-{mode}", indicators={"bits": [4, 3, 2]},
                       ray={"compile": mode})


def _ranking(values: dict[str, dict[int, float]], bits: int) -> list[str]:
    return sorted(values, key=lambda layer: values[layer][bits])


def test_indicator_stage_compiled_and_eager_learn_the_same_indicators(tmp_path: Path, digits_slice: Path) -> None:
    indicators, runs = {}, {}
    for mode in ("off", "on"):
        cfg = _config(tmp_path, digits_slice, mode)
        indicators[mode] = load_indicators(run_indicators(preflight(cfg, sweep=False)))
        tracker = Tracker.from_config(cfg)
        [runs[mode]] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")

    off, on = runs["off"].data, runs["on"].data
    assert off.tags["limpq.compile"] == "ray.compile: off"
    assert "compile_seconds" not in off.metrics and "compiled_passes" not in off.metrics
    assert on.tags["limpq.compile"] == "ray.compile: on"
    # 80 images in steps of 16: the first step's uniform passes initialise the step sizes eagerly
    assert on.metrics["compiled_passes"] == 1 + 4 * 4
    assert on.metrics["compile_seconds"] > 0

    eager, compiled = indicators["off"], indicators["on"]
    assert compiled.layers == eager.layers and compiled.bits == eager.bits
    for kind in ("weight", "act"):
        ours, theirs = getattr(compiled, kind), getattr(eager, kind)
        for layer in eager.layers:
            assert ours[layer] == pytest.approx(theirs[layer], rel=1e-4), (kind, layer)
        for bits in eager.bits:
            assert _ranking(ours, bits) == _ranking(theirs, bits), (kind, bits)
    assert on.metrics["val_top1_w4"] == pytest.approx(off.metrics["val_top1_w4"], abs=1 / 40)  # one val image
