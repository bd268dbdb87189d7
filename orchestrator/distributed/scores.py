"""The scores the sweep's ILP weighs (`search.scores`): the indicator stage's learned step sizes, or
Hessian-trace sensitivities of the FP weights (`orchestrator.train.hessian`), computed as a Ray task
with one training worker's resources at the start of the sweep and kept in the sweep run
(`hessian_scores.json`, the indicators file format with `provenance.scores: hessian`).

Computed in the sweep rather than in place of joint training, so that a hessian config shares the
FP and indicator stages (same stage keys) with the limpq config it is compared with: its policies are
fine-tuned from the same joint model (`finetune.init_from_indicators`) and scored one-shot by it.
"""

from __future__ import annotations

import logging
import time

import ray

from orchestrator.search.indicators import Indicators, load_indicators, save_indicators
from orchestrator.tracking.context import RunContext
from orchestrator.tracking.stages import StageOutput, run_directory
from orchestrator.train.checkpoint import load_checkpoint
from orchestrator.train.hessian import hessian_scores
from orchestrator.train.stages import FP_FILE, INDICATORS_FILE

log = logging.getLogger("limpq")

HESSIAN_FILE = "hessian_scores.json"


def search_scores(context: RunContext, sweep_run_id: str, fp: StageOutput, indicators: StageOutput) -> Indicators:
    """What the sweep's trials search with. Hessian scores are computed once per sweep run: a
    resumed sweep reads its file back, so its remaining trials search what the finished ones did."""
    cfg, dataset, tracker = context.cfg, context.dataset, context.tracker
    if cfg.search.scores == "limpq":
        return load_indicators(indicators.file(INDICATORS_FILE))
    out = run_directory(cfg, sweep_run_id) / HESSIAN_FILE
    if out.is_file():
        return load_indicators(out)
    log.info("sweep: Hessian-trace scores of the FP weights on %d batch(es), %d Hutchinson vector(s) each",
             cfg.search.hessian_batches, cfg.search.hessian_samples)
    task = ray.remote(hessian_scores).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0)
    started = time.monotonic()
    scores = ray.get(task.remote(cfg, dataset, ray.put(load_checkpoint(fp.file(FP_FILE))["model"]),
                                 {"fp_run_id": fp.run_id, "pipeline": cfg.name, "data": cfg.data.path,
                                  "input_size": cfg.model.input_size}))
    save_indicators(scores, out)
    tracker.log_artifact(sweep_run_id, str(out))
    tracker.log_metrics(sweep_run_id, {"hessian_seconds": time.monotonic() - started}, step=0)
    return scores
