"""The pipeline FP -> indicators -> sweep, each stage skipped when MLflow already holds its finished
output for the same settings (its stage hash): rerunning a finished pipeline does no work and a
half-finished one continues where it stopped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from orchestrator.config import PipelineConfig
from orchestrator.tracking import Tracker
from orchestrator.train.checkpoint import save_checkpoint
from orchestrator.train.stages import FP_FILE, INDICATORS_FILE, JOINT_FILE, fp_meta, initial_fp_model

log = logging.getLogger("limpq")

# stage -> artifacts (path in the MLflow run) that make up its output
STAGE_ARTIFACTS = {
    "fp": (f"checkpoint/{FP_FILE}",),
    "indicators": (INDICATORS_FILE, f"checkpoint/{JOINT_FILE}"),
}


def finished_output(cfg: PipelineConfig, tracker: Tracker, stage: str) -> Path | None:
    """The stage's output file when a finished MLflow run holds it (fetched into the run dir if
    missing there), else None."""
    run_id = tracker.find_finished_stage_run(cfg, stage, config_hash=cfg.stage_hash(stage))
    if run_id is None:
        return None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for artifact in STAGE_ARTIFACTS[stage]:
        local = cfg.run_dir / Path(artifact).name
        if not local.exists():
            fetched = tracker.download_artifact(run_id, artifact, cfg.run_dir / ".fetch")
            shutil.move(str(fetched), local)
        outputs.append(local)
    shutil.rmtree(cfg.run_dir / ".fetch", ignore_errors=True)
    log.info("%s: finished in MLflow run %s for the same settings; skipped", stage, run_id)
    return outputs[0]


def fp_stage(cfg: PipelineConfig, tracker: Tracker) -> Path:
    done = finished_output(cfg, tracker, "fp")
    if done is not None:
        return done
    if cfg.fp.source == "train" and cfg.fp.epochs > 0:
        from orchestrator.distributed.train import run_stage

        return run_stage(cfg, "fp", tracker)
    with tracker.open_stage_run(cfg, "fp", config_hash=cfg.stage_hash("fp")) as run:
        out = save_checkpoint(cfg.run_dir / FP_FILE, initial_fp_model(cfg), meta=fp_meta(cfg))
        tracker.log_artifact(run.run_id, out, "checkpoint")
    return out


def indicator_stage(cfg: PipelineConfig, tracker: Tracker, fp_path: Path) -> Path:
    done = finished_output(cfg, tracker, "indicators")
    if done is not None:
        return done
    from orchestrator.distributed.train import run_stage

    return run_stage(cfg, "indicators", tracker, fp_path)


def run_indicators(cfg: PipelineConfig) -> Path:
    """FP weights, then joint indicator training; returns the indicators JSON."""
    cfg = cfg.with_absolute_paths()
    tracker = Tracker.from_config(cfg)
    return indicator_stage(cfg, tracker, fp_stage(cfg, tracker))


def sweep_stage(cfg: PipelineConfig, tracker: Tracker, fp_path: Path, indicators_path: Path) -> list[dict]:
    """The budget sweep; a finished sweep run for the same settings gives its summary back instead."""
    from orchestrator.distributed.sweep import read_summary, run_sweep

    run_id = tracker.find_finished_stage_run(cfg, "sweep")
    if run_id is not None:
        log.info("sweep: finished in MLflow run %s for the same settings; skipped", run_id)
        return read_summary(tracker.download_artifact(run_id, "summary.csv", cfg.run_dir / "sweep"))
    return run_sweep(cfg, tracker, fp_path, indicators_path, indicators_path.parent / JOINT_FILE)


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    """Every stage of the config; prints the sweep report and returns its rows."""
    from orchestrator.distributed.sweep import format_report

    cfg = cfg.with_absolute_paths()
    tracker = Tracker.from_config(cfg)
    fp_path = fp_stage(cfg, tracker)
    indicators_path = indicator_stage(cfg, tracker, fp_path)
    rows = sweep_stage(cfg, tracker, fp_path, indicators_path)
    print(format_report(rows), flush=True)
    print(f"\nMLflow UI: {tracker.ui_command()}", flush=True)
    return rows
