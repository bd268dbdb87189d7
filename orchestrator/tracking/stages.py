"""Finished stages as MLflow holds them: a stage whose key has a FINISHED run is skipped, and its
outputs are that run's artifacts, downloaded into a directory named after the run id (never
"whatever file sits in runs/<name>/"), so two configs with one `name` never read each other's files.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.schema import PipelineConfig
from orchestrator.tracking.runs import Tracker
from orchestrator.train.stages import FP_FILE, INDICATORS_FILE, JOINT_FILE

log = logging.getLogger("limpq")

# stage -> artifacts (paths in its MLflow run) that make up its output
STAGE_ARTIFACTS = {
    "fp": (f"checkpoint/{FP_FILE}",),
    "indicators": (INDICATORS_FILE, f"checkpoint/{JOINT_FILE}"),
}


@dataclass(frozen=True)
class StageOutput:
    """A finished stage: its MLflow run and the local directory holding that run's output files."""

    run_id: str
    directory: Path

    def file(self, name: str) -> Path:
        return self.directory / name


def run_directory(cfg: PipelineConfig, run_id: str) -> Path:
    """Where a stage run's files live locally: one directory per MLflow run."""
    return cfg.run_dir / run_id


def stage_output(cfg: PipelineConfig, tracker: Tracker, stage: str, run_id: str) -> StageOutput:
    """The outputs of a finished stage run, downloaded from its artifacts when not present locally
    (as on a fresh node or another machine)."""
    directory = run_directory(cfg, run_id)
    for artifact in STAGE_ARTIFACTS[stage]:
        local = directory / Path(artifact).name
        if not local.exists():
            fetched = tracker.download_artifact(run_id, artifact, directory / ".fetch")
            shutil.move(str(fetched), local)
    shutil.rmtree(directory / ".fetch", ignore_errors=True)
    return StageOutput(run_id, directory)


def finished_stage(cfg: PipelineConfig, tracker: Tracker, stage: str, key: str) -> StageOutput | None:
    """The outputs of the newest FINISHED run of `stage` with `key`, else None."""
    run_id = tracker.find_finished_stage_run(cfg, stage, key)
    if run_id is None:
        return None
    log.info("%s: finished in MLflow run %s for the same inputs; skipped", stage, run_id)
    return stage_output(cfg, tracker, stage, run_id)
