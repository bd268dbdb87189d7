"""`search.scores: hessian` through the pipeline (real Ray, MLflow, tiny data): the sweep computes the
Hessian-trace scores as a Ray task, keeps them in its run, records the option as a param, and its
trial's policy is the ILP's answer for those scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from pipelines import tiny_config

from orchestrator.checks.preflight import preflight
from orchestrator.checks.stage_keys import stage_keys
from orchestrator.distributed.run import run_pipeline
from orchestrator.distributed.scores import HESSIAN_FILE
from orchestrator.search.ilp import Searcher
from orchestrator.search.indicators import load_indicators
from orchestrator.tracking.runs import Tracker

# about 8 min on the shared 2-core machine (a Ray pipeline with joint training and a one-shot trial)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_hessian_scores_run_through_the_pipeline(tmp_path: Path, digits_slice: Path) -> None:
    cfg = tiny_config(tmp_path, digits_slice, "hessian", indicators={"bits": [4, 3, 2]},
                      search={"scores": "hessian", "hessian_batches": 2, "hessian_samples": 2,
                              "budgets": [{"target_wbits": 3, "target_abits": 3}]})
    checked = preflight(cfg)
    try:
        [row] = run_pipeline(checked)
    finally:
        ray.shutdown()
    assert row["status"] == "ok"
    tracker = Tracker.from_config(cfg)
    [sweep] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'sweep'")
    assert sweep.data.params["search.scores"] == "hessian"
    scores = load_indicators(tracker.download_artifact(sweep.info.run_id, HESSIAN_FILE, tmp_path / "scores"))
    assert scores.provenance["scores"] == "hessian" and scores.provenance["batches"] == 2
    [trial] = tracker.child_runs(sweep.info.run_id)
    policy = json.loads(tracker.download_artifact(trial.info.run_id, "policy.json", tmp_path / "trial").read_text())
    expected = Searcher(scores, checked.costs, alpha=cfg.search.alpha).solve(cfg.search.budgets[0])
    assert [(la["wbits"], la["abits"]) for la in policy["layers"]] == [(la.wbits, la.abits) for la in expected.layers]
    # the joint training it shares with the limpq config of the same settings
    [indicators] = tracker.client.search_runs([tracker.experiment_id], "tags.`limpq.stage` = 'indicators'")
    limpq = cfg.model_copy(update={"search": cfg.search.model_copy(update={"scores": "limpq"})})
    assert indicators.data.tags["limpq.stage_key"] == stage_keys(limpq, checked.dataset.fingerprint).indicators
