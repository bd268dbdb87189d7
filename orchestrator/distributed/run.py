"""The pipeline FP -> indicators -> sweep as one MLflow run tree.

Each stage is keyed by what it reads (`orchestrator.checks.stage_keys`): a stage whose key has a FINISHED
MLflow run is skipped and its outputs are that run's artifacts (`orchestrator.tracking.stages`).
An interrupt (Ctrl-C, SIGTERM from `ray job stop`; see `orchestrator.distributed.interrupts`) marks
every open run of the tree KILLED and propagates; a sweep with failed trials leaves its runs FAILED
and raises `PipelineFailed`, so the process exits non-zero and resubmitting continues where it stopped.
The dataset index and cost table come from preflight (`CheckedConfig`): nothing is listed or traced
again here. The stages share one `RunContext` (`orchestrator.tracking.context`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.checks.preflight import CheckedConfig
from orchestrator.common.errors import PipelineFailed, Terminated
from orchestrator.distributed.interrupts import terminate_as_exception
from orchestrator.distributed.runtime import dashboard_url, stop_ray
from orchestrator.distributed.sweep import run_sweep
from orchestrator.distributed.train import run_fp, run_indicators_training
from orchestrator.tracking.context import RunContext
from orchestrator.tracking.models import registered_model_name
from orchestrator.tracking.onnx_models import onnx_registered_name
from orchestrator.tracking.runs import TAG_ROOT
from orchestrator.tracking.stages import StageOutput
from orchestrator.tracking.summary import format_report, read_finished_sweep
from orchestrator.train.stages import FP_FILE, INDICATORS_FILE

log = logging.getLogger("limpq")

PIPELINE_STAGE = "pipeline"


def root_run_name(context: RunContext) -> str:
    return f"{context.cfg.name}-{context.keys.sweep[:8]}"


def fp_stage(context: RunContext) -> StageOutput:
    cfg, tracker, keys = context.cfg, context.tracker, context.keys
    done = context.finished_stage("fp", keys.fp)
    if done is not None:
        tracker.set_tags(context.root_run_id, {"limpq.fp_run_id": done.run_id})
        return done
    log.info("fp: %s", "training" if cfg.fp.source == "train" and cfg.fp.epochs > 0 else f"from {cfg.fp.source}")
    description = {"train": f"Full-precision {cfg.model.arch} trained for {cfg.fp.epochs} epochs",
                   "torchvision": f"Full-precision {cfg.model.arch} from torchvision weights {cfg.fp.weights}",
                   "checkpoint": f"Full-precision {cfg.model.arch} from {cfg.fp.checkpoint}"}[cfg.fp.source]
    description += "; the starting point of indicator training."
    with context.open_stage("fp", keys.fp, description=description) as run:
        run_fp(cfg, context.dataset, tracker, run.run_id, context.run_directory(run.run_id))
    return StageOutput(run.run_id, context.run_directory(run.run_id))


def indicator_stage(context: RunContext, fp: StageOutput) -> StageOutput:
    cfg, tracker, keys = context.cfg, context.tracker, context.keys
    done = context.finished_stage("indicators", keys.indicators)
    if done is not None:
        tracker.set_tags(context.root_run_id, {"limpq.indicators_run_id": done.run_id})
        return done
    log.info("indicators: joint training at bits %s for %d epoch(s)", cfg.indicators.bits, cfg.indicators.epochs)
    description = (f"Joint quantization-aware training of {cfg.model.arch} at bits {cfg.indicators.bits}: the "
                   f"learned step sizes are the importance indicators (indicators.json); FP run {fp.run_id}.")
    with context.open_stage("indicators", keys.indicators, tags={"limpq.fp_run_id": fp.run_id},
                            description=description) as run:
        run_indicators_training(cfg, context.dataset, tracker, run.run_id, context.run_directory(run.run_id),
                                fp.file(FP_FILE))
    return StageOutput(run.run_id, context.run_directory(run.run_id))


@contextmanager
def pipeline_root(context: RunContext, description: str) -> Iterator[RunContext]:
    """The root run of this pipeline submission (reopened by a resubmission), as the context its
    stages run under; on an interrupt every open run of its tree is marked KILLED before the
    interrupt propagates."""
    tracker, keys = context.tracker, context.keys
    root = tracker.open_stage_run(context.cfg, PIPELINE_STAGE, keys.sweep, run_name=root_run_name(context),
                                  description=description)
    tracker.set_tags(root.run_id, {TAG_ROOT: root.run_id, "limpq.stage_keys": f"fp={keys.fp} "
                                   f"indicators={keys.indicators} sweep={keys.sweep}"})
    try:
        with root:
            yield context.under_root(root.run_id)
    except (KeyboardInterrupt, Terminated) as interrupt:
        stop_ray()  # first: no trial or worker opens or ends a run after the runs are closed below
        killed = tracker.kill_open_runs(root.run_id, f"{type(interrupt).__name__}: {interrupt}")
        log.warning("interrupted: marked %d open run(s) KILLED", len(killed))
        raise


def run_indicators(checked: CheckedConfig) -> Path:
    """FP weights, then joint indicator training; returns the local indicators JSON."""
    context = RunContext.start(checked)
    cfg = context.cfg
    with terminate_as_exception(), pipeline_root(
            context, f"Pipeline {cfg.name}: FP weights and importance indicators of {cfg.model.arch}."
    ) as rooted:
        indicators = indicator_stage(rooted, fp_stage(rooted))
    return indicators.file(INDICATORS_FILE)


def run_pipeline(checked: CheckedConfig) -> list[dict]:
    """Every stage of the config; prints the sweep report and returns its rows. Raises
    `PipelineFailed` after the report when a trial failed or did not run, so the exit status says so
    (and the root and sweep runs stay FAILED: resubmitting reruns just those trials)."""
    context = RunContext.start(checked)
    cfg, tracker = context.cfg, context.tracker
    done = tracker.find_finished_stage_run(cfg, PIPELINE_STAGE, context.keys.sweep, run_name=root_run_name(context))
    rows = read_finished_sweep(cfg, tracker, done) if done is not None else None
    if rows is not None:
        log.info("pipeline: finished in MLflow run %s for the same inputs; nothing to do", done)
        print(format_report(rows), flush=True)
        _print_where_to_look(context)
        return rows
    if done is not None:
        log.info("pipeline: finished in MLflow run %s, but its sweep run was deleted; running the sweep again", done)
    description = (f"Pipeline {cfg.name}: {cfg.model.arch} on {cfg.data.path}, FP -> indicators -> sweep of "
                   f"{len(cfg.search.budgets)} budget(s) and {len(cfg.finetune.baselines)} uniform baseline(s).")
    try:
        with terminate_as_exception(), pipeline_root(context, description) as rooted:
            fp = fp_stage(rooted)
            indicators = indicator_stage(rooted, fp)
            rows = run_sweep(rooted, fp, indicators)
            print(format_report(rows), flush=True)
            failed = [row["budget"] for row in rows if row["status"] != "ok"]
            if failed:
                raise PipelineFailed(f"{len(failed)} of {len(rows)} trials did not finish ({', '.join(failed)}); "
                                     "submit the same config again to rerun just those")
    finally:
        _print_where_to_look(context)
    return rows


def _print_where_to_look(context: RunContext) -> None:
    tracker = context.tracker
    print(f"\nMLflow UI: {tracker.ui_command()}", flush=True)
    url = dashboard_url()
    if url:
        print(f"Ray dashboard: {url} (while Ray runs: Train and Data progress; on a cluster `ray dashboard "
              "ray_cluster.yaml`)", flush=True)
    name = registered_model_name(context.cfg)
    if not tracker.has_model_versions(name):
        return  # nothing registered (every trial failed, or the run stopped before the sweep)
    print(f"Registered model: {name} (aliases best-top1, budget-<label>; "
          f"mlflow.pytorch.load_model('models:/{name}@best-top1'))", flush=True)
    onnx_name = onnx_registered_name(name)
    if tracker.has_model_versions(onnx_name):
        print(f"ONNX (QDQ at the searched bits): {onnx_name}, same aliases; serve it with `mlflow models serve -m "
              f"models:/{onnx_name}@best-top1 --env-manager local`", flush=True)
