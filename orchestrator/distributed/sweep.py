"""Budget sweep on Ray Tune: one trial per budget and one per uniform-precision baseline
(`orchestrator.distributed.trial`), under a sweep run (child of the pipeline's root run) that ends
with the summary of the trial runs (`orchestrator.tracking.summary`).

Placement: a trial is a tiny driver; Train places its worker group, and Ray Data's tasks feed it
from CPUs outside the group. Trials are capped only by what the cluster can ever hold (its
autoscaler's maximum, else its current size, each trial counting its workers plus one CPU for its
data tasks) or by `ray.max_concurrent_trials`: trials beyond what runs now queue, and their pending
worker groups are what make an autoscaler add nodes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial

from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.capacity import cluster_capacity
from orchestrator.distributed.interrupts import run_off_main_thread
from orchestrator.distributed.runtime import ensure_ray, started_local_ray
from orchestrator.distributed.scores import search_scores
from orchestrator.distributed.train import storage_path
from orchestrator.distributed.trial import SweepInputs, sweep_trial
from orchestrator.tracking.context import RunContext
from orchestrator.tracking.models import registered_model_name
from orchestrator.tracking.stages import StageOutput
from orchestrator.tracking.summary import log_summary, observed_concurrency, trial_rows
from orchestrator.tracking.trials import trial_specs
from orchestrator.train.checkpoint import load_checkpoint
from orchestrator.train.stages import FP_FILE, JOINT_FILE

log = logging.getLogger("limpq")

# A fine-tuning trial only drives a Train worker group (whose workers reserve the CPUs and GPUs). It
# asks for memory alone: Tune refuses an empty request, and a token CPU share would leave nodes with
# less than the whole CPU a Ray Data task needs and keep drivers off a CPU-less head.
TRIAL_DRIVER_MEMORY = 512 * 2**20
# CPUs each running trial needs beside its workers' for the Ray Data tasks that feed them.
TRIAL_DATA_CPU = 1


def _trial_name(trial: Trial) -> str:
    return f"{trial.config['trial']['label']}-{trial.trial_id}"


def _trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """A fine-tuning trial only drives its Train worker group; a one-shot trial scores in its own
    process, so it holds one worker's resources."""
    if cfg.finetune.epochs > 0:
        return {"memory": TRIAL_DRIVER_MEMORY}
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return resources


def _concurrency_cap(cfg: PipelineConfig) -> int | None:
    """`ray.max_concurrent_trials`, else as many trials as the cluster can ever hold at once (each
    trial's workers plus one CPU for its data tasks: more would starve the data tasks), else (a
    cluster that may grow) none: trials queue, and their pending worker groups make the autoscaler
    add nodes."""
    if cfg.ray.max_concurrent_trials:
        return cfg.ray.max_concurrent_trials
    capacity = dict(ray.cluster_resources()) if started_local_ray() else cluster_capacity()
    if capacity is None:
        return None
    cap = int(capacity.get("CPU", 0) // (cfg.ray.num_workers * cfg.ray.cpus_per_worker + TRIAL_DATA_CPU))
    if cfg.ray.use_gpu:
        cap = min(cap, int(capacity.get("GPU", 0) // (cfg.ray.num_workers * cfg.ray.gpus_per_worker)))
    return max(1, cap)


def _tune_errors(results: tune.ResultGrid) -> dict[str, str]:
    errors = {}
    for result in results:
        if result.error is not None and result.config:  # a trial that never started has no config
            errors[result.config["trial"]["label"]] = str(result.error).strip().splitlines()[-1][:300]
    return errors


def run_sweep(context: RunContext, fp: StageOutput, indicators: StageOutput) -> list[dict[str, Any]]:
    """Fan the budgets and baselines out on Ray Tune, under the pipeline's root run; returns the
    summary rows (one per trial). The sweep run ends FAILED when any trial did not finish (after
    writing the summary)."""
    cfg, tracker, sweep_key = context.cfg, context.tracker, context.keys.sweep
    ensure_ray(cfg)
    specs = trial_specs(cfg)
    how = "one-shot scores of the joint model" if cfg.finetune.epochs == 0 else "LSQ fine-tuning"
    description = (f"Budget sweep of {cfg.model.arch}: {len(specs)} trials ({how}); summary table, Pareto plot and "
                   f"bits per layer here, one child run per trial; indicators run {indicators.run_id}.")
    with context.open_stage("sweep", sweep_key, description=description,
                            tags={"limpq.indicators_run_id": indicators.run_id,
                                  "limpq.registered_model": registered_model_name(cfg)}) as sweep:
        inputs = SweepInputs(
            context=context, sweep_run_id=sweep.run_id,
            indicators=search_scores(context, sweep.run_id, fp, indicators),
            fp_weights=load_checkpoint(fp.file(FP_FILE))["model"],
            joint_weights=load_checkpoint(indicators.file(JOINT_FILE))["model"]
            if cfg.finetune.init_from_indicators or cfg.finetune.epochs == 0 else None,
        )
        cap = _concurrency_cap(cfg)
        tracker.set_tags(sweep.run_id, {"limpq.max_concurrent_trials": cap or "none: trials queue for resources",
                                        "limpq.trial_worker_group": json.dumps(
            {"workers": cfg.ray.num_workers, "cpus_per_worker": cfg.ray.cpus_per_worker,
             "gpus_per_worker": cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0})})
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(sweep_trial, inputs=inputs), _trial_resources(cfg)),
            param_space={"trial": tune.grid_search([asdict(spec) for spec in specs])},
            # every trial asks for the same resources, so the next one can start in the process the last one
            # finished in, without a new Python and its torch, MLflow and ONNX imports
            tune_config=tune.TuneConfig(max_concurrent_trials=cap, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-sweep-{sweep_key}",
                storage_path=storage_path(cfg),
                failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                verbose=0,  # trial tables stay off the console: the bars and the final table say it
            ),
        )
        log.info("sweep: %d trials (%s), at most %s at once", len(specs), ", ".join(spec.label for spec in specs),
                 cap or "as many as the cluster grows to")
        results = run_off_main_thread(tuner.fit, name="ray-tune-fit")
        rows = trial_rows(cfg, tracker, sweep.run_id, specs, _tune_errors(results))
        tracker.log_metrics(sweep.run_id, {"max_concurrent_trials_observed": observed_concurrency(
            tracker, sweep.run_id)}, step=0)
        log_summary(cfg, tracker, sweep.run_id, rows)
        failed = [row["budget"] for row in rows if row["status"] != "ok"]
        if failed:
            sweep.fail(f"{len(failed)} of {len(rows)} trials did not finish: {', '.join(failed)}")
    return rows
