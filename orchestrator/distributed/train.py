"""FP, joint indicator and fine-tuning training on Ray Train (TorchTrainer), fed by the ray.data
pipeline (each worker reads its share of each epoch, `orchestrator.distributed.datasets`) and recorded
in MLflow. The epochs themselves are `orchestrator.train.loop`'s, and what sets a stage apart is its
`orchestrator.train.stages.Stage`; this module is the Ray wiring around them. A laptop runs it on local Ray.

The driver opens the stage's MLflow run; the rank-0 worker logs per-epoch metrics, Ray Data's
stats and system metrics while training runs (the driver is blocked in `fit()` meanwhile); after
training the driver writes the outputs, logs them as artifacts and as an MLflow model. Checkpoints
go through `ray.train.report` every epoch, so a lost worker restarts the group from the last one
(`fit_with_retries`), and submitting the same run again resumes a crashed job (Train V2 restores a
run from its (storage_path, name)).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.common.collective import sum_across_workers, world_size
from orchestrator.common.errors import UserError, user_error_in
from orchestrator.common.plots import indicator_heatmap
from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import DatasetIndex
from orchestrator.data.transforms import augments_for
from orchestrator.compat import system_metrics_monitor
from orchestrator.distributed.datasets import (
    SkipCounter,
    TrainingData,
    epoch_dataset,
    iter_batches,
    training_data,
)
from orchestrator.distributed.interrupts import run_off_main_thread
from orchestrator.distributed.runtime import TRAIN_LOGGING, ensure_ray
from orchestrator.quant.policy import BitAssignment, extract_indicators
from orchestrator.search.indicators import save_indicators
from orchestrator.tracking.models import log_model
from orchestrator.tracking.runs import Tracker
from orchestrator.train.checkpoint import (
    load_checkpoint,
    restore_model,
    restore_rng,
    save_checkpoint,
)
from orchestrator.train.loop import Workers, train_one_epoch, validate
from orchestrator.train.progress import Progress
from orchestrator.train.stages import (
    FP,
    FP_FILE,
    INDICATORS_FILE,
    JOINT_FILE,
    STAGES,
    Stage,
    StageStart,
    fp_meta,
    seed_epoch,
    untrained_joint_model,
)

log = logging.getLogger("limpq")

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class StageInputs:
    """What a stage's workers start from beside the config: weights as values or as object refs into
    the driver's object store, and fine-tuning's policy; `report_extra` joins every epoch's metrics."""

    fp_weights: Any = None
    joint_weights: Any = None
    policy: BitAssignment | None = None
    report_extra: Mapping[str, float] = field(default_factory=dict)

    def start(self) -> StageStart:
        """The weights fetched from the object store (on a worker)."""
        return StageStart(_resolve(self.fp_weights), _resolve(self.joint_weights), self.policy)


@dataclass(frozen=True)
class WorkerInputs:
    """Everything a Ray Train worker of one stage is given (`train_loop_config["inputs"]`)."""

    cfg: PipelineConfig
    stage: Stage
    steps_per_epoch: int
    data: ray.ObjectRef  # TrainingData
    tracker: Tracker
    run_id: str
    label: str
    inputs: StageInputs


def _resolve(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _every_worker_has_batch(has_batch: bool) -> bool:
    """Shards can differ by a few rows (skipped images): all workers stop at the shortest one,
    or DDP would wait forever for the worker that ran out."""
    return sum_across_workers([1.0 if has_batch else 0.0], dist.ReduceOp.MIN)[0] > 0


def _system_metrics(tracker: Tracker | None, run_id: str | None):
    """MLflow's system-metrics monitor (CPU, memory, GPU when present) on this worker's run, or None."""
    if tracker is None or run_id is None:
        return None
    mlflow.set_tracking_uri(tracker.tracking_uri)
    try:
        monitor = system_metrics_monitor(run_id, sampling_interval=5, samples_before_logging=2)
    except Exception as error:  # a missing optional probe (e.g. no GPU library) must not stop training
        log.warning("system metrics unavailable: %s", error)
        return None
    monitor.start()
    return monitor


def train_loop_per_worker(config: dict[str, WorkerInputs]) -> None:
    """One Ray Train worker of a stage: `orchestrator.train.loop` over this worker's shard of each
    epoch, with metrics reduced over the worker group, a checkpoint reported every epoch."""
    worker: WorkerInputs = config["inputs"]
    cfg, stage = worker.cfg, worker.stage
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data: TrainingData = ray.get(worker.data)
    device = ray.train.torch.get_device()
    model = stage.build_model(cfg, worker.inputs.start())
    payload = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = load_checkpoint(Path(directory) / STATE_FILE)
        restore_model(model, payload["model"], f"checkpoint of run {cfg.name}")
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    training = stage.training(model, cfg, worker.steps_per_epoch)
    start_epoch = 0
    if payload is not None:
        training.optimizer.load_state_dict(payload["optimizer"])
        training.scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], training.policy_rng)
        start_epoch = payload["epoch"]
        log.info("%s: resuming at epoch %d from the last checkpoint", stage.name, start_epoch + 1)

    tracker = worker.tracker if rank == 0 else None
    if tracker is not None:
        tracker.set_tags(worker.run_id, {"limpq.compile": training.compile.reason})
    monitor = _system_metrics(tracker, worker.run_id)
    workers = Workers(world_size(), sum_across_workers, _every_worker_has_batch)
    val = epoch_dataset(data, "val", rank=rank, world=world)  # the same in every epoch
    epochs = stage.recipe(cfg).epochs
    progress = Progress(worker.label, epochs, worker.steps_per_epoch, bar=tqdm_ray.tqdm, enabled=rank == 0)
    try:
        for epoch in range(start_epoch, epochs):
            seed_epoch(cfg.seed, stage.name, rank, epoch)
            train = epoch_dataset(data, "train", epoch, rank, world)  # what an uninterrupted run reads in this epoch
            # closed after the epoch: the other workers may stop at a shorter share, the rest is not read
            with closing(iter_batches(train, cfg.data.batch_size, device,
                                      drop_last=not stage.keep_partial_batch)) as batches:
                metrics = train_one_epoch(model, training, batches, worker.steps_per_epoch, epoch, workers, progress)
            metrics.update(validate(model, iter_batches(val, cfg.data.batch_size, device), training.criterion,
                                    stage.validation_policies(model, cfg), stage.validation_metrics,
                                    cfg.training.bf16, workers))
            metrics["epoch"] = epoch + 1
            metrics.update(worker.inputs.report_extra)
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(Path(directory) / STATE_FILE, model, optimizer=training.optimizer,
                                    scheduler=training.scheduler, epoch=epoch + 1, policy_rng=training.policy_rng,
                                    meta=fp_meta(cfg.model))
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                    if tracker is not None:
                        tracker.log_metrics(worker.run_id, metrics, step=epoch + 1)
                        tracker.log_text(worker.run_id, train.stats(), f"data_stats/epoch_{epoch + 1:03d}.txt")
                ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        progress.close()
        if monitor is not None:
            monitor.finish()


def _scaling(cfg: PipelineConfig) -> ScalingConfig:
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources)


def storage_path(cfg: PipelineConfig) -> str:
    """Ray's storage path: URIs as given, local paths absolute (trials run in other directories)."""
    path = cfg.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


def steps_per_epoch(cfg: PipelineConfig, dataset: DatasetIndex, stage: str) -> int:
    """Steps per epoch of a worker of the stage named `stage`: the schedule's length. The loop itself
    stops at the shortest shard, so skipped images only end an epoch a step early."""
    per_worker = dataset.count("train", STAGES[stage].recipe(cfg).train_fraction, cfg.seed) / cfg.ray.num_workers
    steps = STAGES[stage].steps_per_epoch(per_worker, cfg.data.batch_size)
    if steps < 1:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} is larger than a worker's share of the {stage} "
                        f"training data ({int(per_worker)} images); lower it or use fewer ray.num_workers")
    return steps


def fit_with_retries(trainer: Callable[[], TorchTrainer], max_failures: int, label: str) -> Result:
    """Fit, and after a failure fit the same run again (Train resumes it from its last checkpoint) up
    to `max_failures` times; a failure whose root is a UserError (a corrupt checkpoint, a diverged
    loss: it would fail the same way again) ends the stage at once. Ray Train's own retries cannot do
    this: its failure policy retries every worker error alike and has no public hook to tell them apart."""
    for attempt in range(max_failures + 1):
        try:
            return run_off_main_thread(trainer().fit, name="ray-train-fit")
        except TrainingFailedError as error:
            if user_error_in(error) is not None or attempt == max_failures:
                raise
            log.warning("%s: training failed (%s); resuming from its last checkpoint, retry %d of %d", label,
                        str(error).strip().splitlines()[-1][:200], attempt + 1, max_failures)
    raise AssertionError("unreachable: the last attempt returns or raises")


def train_on_ray(cfg: PipelineConfig, dataset: DatasetIndex, stage: str, tracker: Tracker, run_id: str,
                 inputs: StageInputs | None = None, label: str | None = None) -> tuple[dict, dict[str, float]]:
    """Run the TorchTrainer of the stage named `stage` ("fp", "indicators", "finetune") on `dataset`;
    returns the final model state and the last epoch's metrics.

    `inputs` go to every worker. The Ray Train run is named after the MLflow run `run_id`, so a reopened
    MLflow run (a resubmission, a Tune retry) resumes from its last checkpoint, and a new one (its old run
    deleted in the MLflow UI) trains from the start. The skipped-image count is logged to `run_id`.
    """
    ensure_ray(cfg)
    recipe = STAGES[stage].recipe(cfg)
    counter = SkipCounter()
    data = training_data(dataset, augments_for(cfg.data, cfg.model.input_size), input_size=cfg.model.input_size,
                         num_classes=cfg.model.num_classes, seed=cfg.seed, skip_counter=counter,
                         train_fraction=recipe.train_fraction)
    per_epoch = steps_per_epoch(cfg, dataset, stage)
    tracker.set_tags(run_id, {"limpq.steps_per_epoch": per_epoch})
    worker = WorkerInputs(cfg, STAGES[stage], per_epoch, ray.put(data), tracker, run_id, label or stage,
                          inputs or StageInputs())

    def trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"inputs": worker},
            scaling_config=_scaling(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"{cfg.name}-{label or stage}-{run_id}",
                storage_path=storage_path(cfg),
                failure_config=FailureConfig(max_failures=0),  # retried below, where a user's mistake is told apart
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=TRAIN_LOGGING,
            ),
        )

    result = fit_with_retries(trainer, cfg.ray.max_failures, label or stage)
    skipped = counter.counts()
    tracker.log_metrics(run_id, {f"skipped_images_{split}": n for split, n in skipped.items()}, step=recipe.epochs)
    if any(skipped.values()):
        log.warning("skipped unreadable images: %s", skipped)
    # a run resumed from its final checkpoint trains no epoch and reports nothing: its epochs' metrics are in MLflow
    metrics = dict(result.metrics or {}) or tracker.run_metrics(run_id)
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / STATE_FILE)["model"], metrics


def log_dataset_inputs(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str, stage: str) -> None:
    """Lineage of the data a training run read: the dataset's location, content digest and sizes,
    once for its training subset and once for the validation split."""
    fingerprint = dataset.fingerprint
    name = dataset.source.rstrip("/").rsplit("/", 1)[-1] or dataset.source
    fraction = STAGES[stage].recipe(cfg).train_fraction
    for split, context, extra in (("train", "training", {"train_fraction": fraction,
                                                          "images": dataset.count("train", fraction, cfg.seed)}),
                                  ("val", "validation", {"images": dataset.count("val")})):
        sizes = fingerprint["splits"][split]
        # one dataset entry per split: MLflow keeps one input per (name, digest) and run
        tracker.log_dataset(run_id, dataset.source, f"{name}/{split}", sizes["sha256"], context,
                            {"split": split, "format": fingerprint["format"], "files": sizes["files"],
                             "bytes": sizes["bytes"], **extra})


def example_input(cfg: PipelineConfig) -> torch.Tensor:
    """The model's input for signatures: one normalized image batch at the configured size."""
    return torch.zeros(1, 3, cfg.model.input_size, cfg.model.input_size)


def run_fp(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str, directory: Path) -> Path:
    """The FP stage into `directory`: trained on Ray Train, or taken from torchvision/a checkpoint."""
    ensure_ray(cfg)
    model = FP.build_model(cfg, StageStart())
    if cfg.fp.source == "train" and cfg.fp.epochs > 0:
        log_dataset_inputs(cfg, dataset, tracker, run_id, "fp")
        state, _ = train_on_ray(cfg, dataset, "fp", tracker, run_id)
        restore_model(model, state, "final FP checkpoint")
    out = save_checkpoint(directory / FP_FILE, model, meta=fp_meta(cfg.model))
    tracker.log_artifact(run_id, str(out), "checkpoint")
    log_model(tracker, run_id, model, example_input(cfg), name="fp-model",
              step=max(cfg.fp.epochs, 1) if cfg.fp.source == "train" else 0,
              tags={"limpq.stage": "fp", "limpq.arch": cfg.model.arch})
    return out


def run_indicators_training(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str,
                            directory: Path, fp_path: Path) -> Path:
    """Joint indicator training on Ray Train into `directory`: joint.pt, indicators.json, a heatmap,
    all logged to `run_id`, with the joint model as an MLflow model."""
    ensure_ray(cfg)
    log_dataset_inputs(cfg, dataset, tracker, run_id, "indicators")
    inputs = StageInputs(fp_weights=ray.put(load_checkpoint(fp_path)["model"]))
    state, _ = train_on_ray(cfg, dataset, "indicators", tracker, run_id, inputs)
    model = untrained_joint_model(cfg.model, cfg.indicators.bits)
    restore_model(model, state, "final joint checkpoint")
    joint = save_checkpoint(directory / JOINT_FILE, model, meta=fp_meta(cfg.model))
    indicators = extract_indicators(model, cfg.model.arch, provenance={
        "run_id": run_id, "pipeline": cfg.name, "epochs": cfg.indicators.epochs,
        "train_fraction": cfg.indicators.train_fraction, "data": cfg.data.path, "input_size": cfg.model.input_size,
    })
    out = directory / INDICATORS_FILE
    save_indicators(indicators, out)
    heatmap = directory / "indicators.png"
    indicator_heatmap(indicators.layers, indicators.bits,
                      [[indicators.weight[n][b] for b in indicators.bits] for n in indicators.layers],
                      [[indicators.act[n][b] for b in indicators.bits] for n in indicators.layers],
                      heatmap, title=f"{cfg.model.arch} step sizes ({cfg.name})")
    for path, folder in ((out, None), (heatmap, "plots"), (joint, "checkpoint")):
        tracker.log_artifact(run_id, str(path), folder)
    log_model(tracker, run_id, model, example_input(cfg), name="joint-model", step=cfg.indicators.epochs,
              tags={"limpq.stage": "indicators", "limpq.arch": cfg.model.arch,
                    "limpq.bits": ",".join(map(str, cfg.indicators.bits))})
    return out
