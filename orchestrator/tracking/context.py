"""The context one command's stages share: the config, what preflight computed, where MLflow records
and the stage keys, built once when the command starts and handed down whole (to Ray tasks and Tune
trials too: it pickles), instead of the same five values through every signature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator.checks.preflight import CheckedConfig
from orchestrator.checks.stage_keys import StageKeys, stage_keys
from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import DatasetIndex, prepare_dataset
from orchestrator.search.costs import CostTable
from orchestrator.tracking.runs import TAG_ROOT, StageRun, Tracker
from orchestrator.tracking.stages import StageOutput, finished_stage, run_directory


@dataclass(frozen=True)
class RunContext:
    """One command's config (local paths absolute: Ray workers and trials run in other directories),
    its dataset (listed once), the model's cost table, its tracker and stage keys, and, once the
    pipeline's root MLflow run is open, that run's id (`under_root`)."""

    cfg: PipelineConfig
    dataset: DatasetIndex
    costs: CostTable
    tracker: Tracker
    keys: StageKeys
    root_run_id: str | None = None

    @classmethod
    def start(cls, checked: CheckedConfig) -> RunContext:
        """The context of a checked config; the digits demo is built now when it is still to be built."""
        cfg = checked.config.with_absolute_paths()
        dataset = checked.dataset or prepare_dataset(cfg.data)
        return cls(cfg, dataset, checked.costs, Tracker.from_config(cfg), stage_keys(cfg, dataset.fingerprint))

    def under_root(self, root_run_id: str) -> RunContext:
        return replace(self, root_run_id=root_run_id)

    def open_stage(self, stage: str, key: str, *, parent_run_id: str | None = None, run_name: str | None = None,
                   tags: Mapping[str, str] | None = None, description: str | None = None) -> StageRun:
        """`Tracker.open_stage_run` of this config in the root run's tree: a child of `parent_run_id`,
        else of the root run, tagged with the root run (which `Tracker.kill_open_runs` looks for)."""
        return self.tracker.open_stage_run(self.cfg, stage, key, parent_run_id=parent_run_id or self.root_run_id,
                                           run_name=run_name, extra_tags={TAG_ROOT: self.root_run_id, **(tags or {})},
                                           description=description)

    def finished_stage(self, stage: str, key: str) -> StageOutput | None:
        return finished_stage(self.cfg, self.tracker, stage, key)

    def run_directory(self, run_id: str) -> Path:
        return run_directory(self.cfg, run_id)
