"""The pipeline FP -> indicators -> sweep as one MLflow run tree.

Each stage is keyed by what it reads (`orchestrator.stagekeys`): a stage whose key has a FINISHED
MLflow run is skipped and its outputs are that run's artifacts, downloaded into a directory named
after the run id (never "whatever file sits in runs/<name>/"), so two configs with one `name`
never read each other's files. An interrupt (Ctrl-C, SIGTERM from `ray job stop`) marks every open
run of the tree KILLED and propagates; a sweep with failed trials leaves its runs FAILED and raises
`PipelineFailed`, so the process exits non-zero and resubmitting continues where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import PipelineConfig
from orchestrator.errors import PipelineFailed, Terminated
from orchestrator.stagekeys import StageKeys, stage_keys
from orchestrator.tracking import TAG_ROOT, Tracker
from orchestrator.train.stages import FP_FILE, INDICATORS_FILE, JOINT_FILE

log = logging.getLogger("limpq")

# stage -> artifacts (paths in its MLflow run) that make up its output
STAGE_ARTIFACTS = {
    "fp": (f"checkpoint/{FP_FILE}",),
    "indicators": (INDICATORS_FILE, f"checkpoint/{JOINT_FILE}"),
}
PIPELINE_STAGE = "pipeline"


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


def root_run_name(cfg: PipelineConfig, keys: StageKeys) -> str:
    return f"{cfg.name}-{keys.sweep[:8]}"


def _stage_tags(root_run_id: str) -> dict[str, str]:
    return {TAG_ROOT: root_run_id}


def fp_stage(cfg: PipelineConfig, tracker: Tracker, keys: StageKeys, root_run_id: str) -> StageOutput:
    done = finished_stage(cfg, tracker, "fp", keys.fp)
    if done is not None:
        tracker.set_tags(root_run_id, {"limpq.fp_run_id": done.run_id})
        return done
    from orchestrator.distributed.train import run_fp

    log.info("fp: %s", "training" if cfg.fp.source == "train" and cfg.fp.epochs > 0 else f"from {cfg.fp.source}")
    description = {"train": f"Full-precision {cfg.model.arch} trained for {cfg.fp.epochs} epochs",
                   "torchvision": f"Full-precision {cfg.model.arch} from torchvision weights {cfg.fp.weights}",
                   "checkpoint": f"Full-precision {cfg.model.arch} from {cfg.fp.checkpoint}"}[cfg.fp.source]
    with tracker.open_stage_run(cfg, "fp", keys.fp, parent_run_id=root_run_id, extra_tags=_stage_tags(root_run_id),
                                description=description + "; the starting point of indicator training.") as run:
        run_fp(cfg, tracker, run.run_id, run_directory(cfg, run.run_id), train_name=f"{cfg.name}-fp-{keys.fp}")
    return StageOutput(run.run_id, run_directory(cfg, run.run_id))


def indicator_stage(cfg: PipelineConfig, tracker: Tracker, keys: StageKeys, root_run_id: str,
                    fp: StageOutput) -> StageOutput:
    done = finished_stage(cfg, tracker, "indicators", keys.indicators)
    if done is not None:
        tracker.set_tags(root_run_id, {"limpq.indicators_run_id": done.run_id})
        return done
    from orchestrator.distributed.train import run_indicators_training

    log.info("indicators: joint training at bits %s for %d epoch(s)", cfg.indicators.bits, cfg.indicators.epochs)
    description = (f"Joint quantization-aware training of {cfg.model.arch} at bits {cfg.indicators.bits}: the "
                   f"learned step sizes are the importance indicators (indicators.json); FP run {fp.run_id}.")
    with tracker.open_stage_run(cfg, "indicators", keys.indicators, parent_run_id=root_run_id,
                                extra_tags={**_stage_tags(root_run_id), "limpq.fp_run_id": fp.run_id},
                                description=description) as run:
        run_indicators_training(cfg, tracker, run.run_id, run_directory(cfg, run.run_id), fp.file(FP_FILE),
                                train_name=f"{cfg.name}-indicators-{keys.indicators}")
    return StageOutput(run.run_id, run_directory(cfg, run.run_id))


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM (what `ray job stop` and most schedulers send) raises `Terminated` in the main
    thread, so every open run is closed KILLED like after Ctrl-C."""
    def raise_terminated(signum, _frame):
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals to the host
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def pipeline_root(cfg: PipelineConfig, tracker: Tracker, keys: StageKeys, description: str) -> Iterator[str]:
    """The root run of this pipeline submission (reopened by a resubmission); on an interrupt every
    open run of its tree is marked KILLED before the interrupt propagates."""
    root = tracker.open_stage_run(cfg, PIPELINE_STAGE, keys.sweep, run_name=root_run_name(cfg, keys),
                                  description=description)
    tracker.set_tags(root.run_id, {TAG_ROOT: root.run_id, "limpq.stage_keys": f"fp={keys.fp} "
                                   f"indicators={keys.indicators} sweep={keys.sweep}"})
    try:
        with root:
            yield root.run_id
    except (KeyboardInterrupt, Terminated) as interrupt:
        killed = tracker.kill_open_runs(root.run_id, f"{type(interrupt).__name__}: {interrupt}")
        log.warning("interrupted: marked %d open run(s) KILLED", len(killed))
        raise


def run_indicators(cfg: PipelineConfig) -> Path:
    """FP weights, then joint indicator training; returns the local indicators JSON."""
    cfg = cfg.with_absolute_paths()
    tracker = Tracker.from_config(cfg)
    keys = stage_keys(cfg)
    with terminate_as_exception(), pipeline_root(
            cfg, tracker, keys, f"Pipeline {cfg.name}: FP weights and importance indicators of {cfg.model.arch}."
    ) as root_id:
        indicators = indicator_stage(cfg, tracker, keys, root_id, fp_stage(cfg, tracker, keys, root_id))
    return indicators.file(INDICATORS_FILE)


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    """Every stage of the config; prints the sweep report and returns its rows. Raises
    `PipelineFailed` after the report when a trial failed or did not run, so the exit status says so
    (and the root and sweep runs stay FAILED: resubmitting reruns just those trials)."""
    from orchestrator.distributed.sweep import format_report, read_finished_sweep, run_sweep

    cfg = cfg.with_absolute_paths()
    tracker = Tracker.from_config(cfg)
    keys = stage_keys(cfg)
    done = tracker.find_finished_stage_run(cfg, PIPELINE_STAGE, keys.sweep, run_name=root_run_name(cfg, keys))
    if done is not None:
        log.info("pipeline: finished in MLflow run %s for the same inputs; nothing to do", done)
        rows = read_finished_sweep(cfg, tracker, done)
        print(format_report(rows), flush=True)
        _print_where_to_look(cfg, tracker)
        return rows
    description = (f"Pipeline {cfg.name}: {cfg.model.arch} on {cfg.data.path}, FP -> indicators -> sweep of "
                   f"{len(cfg.search.budgets)} budget(s) and {len(cfg.finetune.baselines)} uniform baseline(s).")
    try:
        with terminate_as_exception(), pipeline_root(cfg, tracker, keys, description) as root_id:
            fp = fp_stage(cfg, tracker, keys, root_id)
            indicators = indicator_stage(cfg, tracker, keys, root_id, fp)
            rows = run_sweep(cfg, tracker, keys, root_id, fp, indicators)
            print(format_report(rows), flush=True)
            failed = [row["budget"] for row in rows if row["status"] != "ok"]
            if failed:
                raise PipelineFailed(f"{len(failed)} of {len(rows)} trials did not finish ({', '.join(failed)}); "
                                     "submit the same config again to rerun just those")
    finally:
        _print_where_to_look(cfg, tracker)
    return rows


def _print_where_to_look(cfg: PipelineConfig, tracker: Tracker) -> None:
    from orchestrator.distributed.onnx_models import onnx_registered_name
    from orchestrator.distributed.runtime import dashboard_url
    from orchestrator.distributed.sweep import registered_model_name

    print(f"\nMLflow UI: {tracker.ui_command()}", flush=True)
    url = dashboard_url()
    if url:
        print(f"Ray dashboard: {url} (while Ray runs: Train and Data progress; on a cluster `ray dashboard "
              "ray_cluster.yaml`)", flush=True)
    print(f"Registered model: {registered_model_name(cfg)} (aliases best-top1, budget-<label>; "
          f"mlflow.pytorch.load_model('models:/{registered_model_name(cfg)}@best-top1'))", flush=True)
    onnx_name = onnx_registered_name(registered_model_name(cfg))
    print(f"ONNX (QDQ at the searched bits): {onnx_name}, same aliases; serve it with `mlflow models serve -m "
          f"models:/{onnx_name}@best-top1 --env-manager local`", flush=True)
