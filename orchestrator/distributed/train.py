"""FP, joint indicator and fine-tuning training on Ray Train (TorchTrainer), fed by the ray.data
pipeline (each worker reads its share of each epoch, `orchestrator.distributed.datasets`) and recorded
in MLflow. This is the only training loop: a laptop runs it on local Ray.

The driver opens the stage's MLflow run; the rank-0 worker logs per-epoch metrics, Ray Data's
stats and system metrics while training runs (the driver is blocked in `fit()` meanwhile); after
training the driver writes the outputs, logs them as artifacts and as an MLflow model. Checkpoints
go through `ray.train.report` every epoch, so a lost worker restarts the group from the last one
(`fit_with_retries`), and submitting the same run again resumes a crashed job (Train V2 restores a
run from its (storage_path, name)).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
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

from orchestrator.config.schema import PipelineConfig, RecipeConfig
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
from orchestrator.common.errors import UserError, user_error_in
from orchestrator.search.indicators import save_indicators
from orchestrator.common.plots import indicator_heatmap
from orchestrator.quant.policy import extract_indicators, uniform_policy
from orchestrator.tracking.models import log_model
from orchestrator.tracking.runs import Tracker
from orchestrator.train.checkpoint import (
    load_checkpoint,
    restore_model,
    restore_rng,
    save_checkpoint,
)
from orchestrator.train.compiled import CompiledPass
from orchestrator.train.progress import Progress
from orchestrator.train.stages import (
    FP_FILE,
    INDICATORS_FILE,
    JOINT_FILE,
    finetune_model,
    fp_meta,
    initial_fp_model,
    joint_from_fp,
    joint_training,
    plain_training,
    seed_epoch,
    untrained_joint_model,
)
from orchestrator.train.steps import evaluate_policies

log = logging.getLogger("limpq")

STATE_FILE = "state.pt"


def stage_recipe(cfg: PipelineConfig, stage: str) -> RecipeConfig:
    return {"fp": cfg.fp, "indicators": cfg.indicators, "finetune": cfg.finetune}[stage]


class MetricSums:
    """Sample-weighted running sums of step metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * samples
        self.count += samples

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _mean_across_workers(metrics: dict[str, float]) -> dict[str, float]:
    keys = sorted(metrics)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {k: v / world for k, v in zip(keys, _all_reduce([metrics[k] for k in keys]))}


def _every_worker_has_batch(has_batch: bool) -> bool:
    """Shards can differ by a few rows (skipped images): all workers stop at the shortest one,
    or DDP would wait forever for the worker that ran out."""
    return _all_reduce([1.0 if has_batch else 0.0], op=dist.ReduceOp.MIN)[0] > 0


def _validation(model, cfg: PipelineConfig, stage: str, criterion, device, val: ray.data.Dataset) -> dict[str, float]:
    """Validation over every worker's share of the val set, aggregated by sample count. The joint
    model is scored at every uniform bit-width on the same batches (the split is decoded once per
    epoch); other models as they stand (FP, or their fixed policy)."""
    policies = {f"_w{b}": uniform_policy(model, b) for b in cfg.indicators.bits} if stage == "indicators" else {"": None}
    results = evaluate_policies(model, iter_batches(val, cfg.data.batch_size, device), criterion, policies,
                                cfg.ray.bf16)
    metrics = {}
    for suffix, result in results.items():
        n = result["samples"]
        sums = _all_reduce([result[k] * n if n else 0.0 for k in ("loss", "top1", "top5")] + [float(n)])
        for key, total in zip(("loss", "top1", "top5"), sums):
            if key != "top5" or stage != "indicators":
                metrics[f"val_{key}{suffix}"] = total / max(sums[-1], 1)
    return metrics


def _compile_metrics(compiled: CompiledPass | None) -> dict[str, float]:
    """This worker's compilation cost so far (seconds, the same every epoch once compiled; counted in
    the epoch's images_per_second) and how many passes ran compiled; nothing when eager."""
    if compiled is None:
        return {}
    metrics = {"compiled_passes": float(compiled.calls)}
    if compiled.compile_seconds is not None:
        metrics["compile_seconds"] = compiled.compile_seconds
    return metrics


def _worker_model(cfg: PipelineConfig, stage: str, config: dict[str, Any]) -> torch.nn.Module:
    if stage == "fp":
        return initial_fp_model(cfg.model, cfg.fp, cfg.seed)
    fp_state = _resolve(config["fp_weights"])
    if stage == "finetune":
        return finetune_model(cfg.model, cfg.indicators.bits, fp_state, config["policy"],
                              _resolve(config.get("joint_weights")))
    return joint_from_fp(cfg.model, cfg.indicators.bits, fp_state)


def _resolve(value: Any) -> Any:
    """Weights arrive as object refs (from the driver's object store) or as values."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of the FP, indicator or fine-tuning stage."""
    cfg: PipelineConfig = config["pipeline"]
    stage: str = config["stage"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data: TrainingData = _resolve(config["data"])
    device = ray.train.torch.get_device()
    recipe = stage_recipe(cfg, stage)
    per_epoch: int = config["steps_per_epoch"]
    model = _worker_model(cfg, stage, config)
    payload = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = load_checkpoint(Path(directory) / STATE_FILE)
        restore_model(model, payload["model"], f"checkpoint of run {cfg.name}")
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    training = (joint_training(model, cfg.indicators, per_epoch, cfg.seed, cfg.ray.bf16, cfg.ray.compile)
                if stage == "indicators"
                else plain_training(model, recipe, per_epoch, cfg.ray.bf16, cfg.ray.compile))
    start_epoch = 0
    if payload is not None:
        training.optimizer.load_state_dict(payload["optimizer"])
        training.scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], training.policy_rng)
        start_epoch = payload["epoch"]
        log.info("%s: resuming at epoch %d from the last checkpoint", stage, start_epoch + 1)

    tracker: Tracker | None = config.get("tracker") if rank == 0 else None
    if tracker is not None:
        tracker.set_tags(config["run_id"], {"limpq.compile": training.compile.reason})
    monitor = _system_metrics(tracker, config.get("run_id"))
    val = epoch_dataset(data, "val", rank=rank, world=world)  # the same in every epoch
    progress = Progress(config.get("label", stage), recipe.epochs, per_epoch, bar=tqdm_ray.tqdm, enabled=rank == 0)
    keep_partial = stage == "indicators"  # the reference keeps an epoch's last partial batch
    try:
        for epoch in range(start_epoch, recipe.epochs):
            seed_epoch(cfg.seed, stage, rank, epoch)
            model.train()
            sums, started, images = MetricSums(), time.monotonic(), 0
            train = epoch_dataset(data, "train", epoch, rank, world)  # what an uninterrupted run reads in this epoch
            batches = iter_batches(train, cfg.data.batch_size, device, drop_last=not keep_partial)
            for step in range(per_epoch):
                batch = next(batches, None)
                # a kept last batch of one image cannot go through BatchNorm in training mode: it ends the epoch
                if not _every_worker_has_batch(batch is not None and len(batch[1]) > 1):
                    break
                x, y = batch
                metrics = training.step(x, y)
                training.scheduler.step()  # per step; a per-epoch schedule holds its rate within the epoch
                sums.add(metrics, len(y))
                images += len(y)
                progress.update(epoch, step, len(y), metrics)
            batches.close()  # the other workers may stop at a shorter share: the rest is not read
            progress.close()  # the epoch's bar ends with its steps, before validation
            seconds = time.monotonic() - started
            metrics = _mean_across_workers(sums.means())
            metrics["images_per_second"] = _all_reduce([images / max(seconds, 1e-9)])[0]
            metrics.update(_compile_metrics(training.compiled))
            metrics.update(_validation(model, cfg, stage, training.criterion, device, val))
            metrics["epoch"] = epoch + 1
            metrics.update(config.get("report_extra", {}))
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(Path(directory) / STATE_FILE, model, optimizer=training.optimizer,
                                    scheduler=training.scheduler, epoch=epoch + 1, policy_rng=training.policy_rng,
                                    meta=fp_meta(cfg.model))
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                    if tracker is not None:
                        tracker.log_metrics(config["run_id"], metrics, step=epoch + 1)
                        tracker.client.log_text(config["run_id"], train.stats(),
                                                f"data_stats/epoch_{epoch + 1:03d}.txt")
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
    """Steps per epoch of a worker: the schedule's length. The loop itself stops at the shortest
    shard, so skipped images only end an epoch a step early. The indicator stage keeps the last
    partial batch; the others drop it (a batch of one breaks BatchNorm)."""
    per_worker = dataset.count("train", stage_recipe(cfg, stage).train_fraction, cfg.seed) / cfg.ray.num_workers
    steps = math.ceil(per_worker / cfg.data.batch_size) if stage == "indicators" else int(per_worker // cfg.data.batch_size)
    if steps < 1:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} is larger than a worker's share of the {stage} "
                        f"training data ({int(per_worker)} images); lower it or use fewer ray.num_workers")
    return steps


def fit_with_retries(trainer: Callable[[], TorchTrainer], max_failures: int, label: str) -> Result:
    """Fit, and after a failure fit the same run again (Train resumes it from its last checkpoint) up
    to `max_failures` times; a failure whose root is a UserError (a corrupt checkpoint, a diverged
    loss: it would fail the same way again) ends the stage at once. Ray Train's own retries cannot do
    this: its failure policy (Ray 2.60) retries every worker error alike and has no public hook."""
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
                 run_name: str, inputs: dict[str, Any] | None = None,
                 label: str | None = None) -> tuple[dict, dict[str, float]]:
    """Run one stage's TorchTrainer (FP, indicators or fine-tuning) on `dataset`; returns the final
    model state and the last epoch's metrics.

    `inputs` go to every worker (weights as object refs, a policy); the same `run_name` under the
    same storage path resumes a crashed run from its last checkpoint. The skipped-image count is
    logged to `run_id`.
    """
    ensure_ray(cfg)
    recipe = stage_recipe(cfg, stage)
    counter = SkipCounter()
    data = training_data(dataset, augments_for(cfg.data, cfg.model.input_size), input_size=cfg.model.input_size,
                         num_classes=cfg.model.num_classes, seed=cfg.seed, skip_counter=counter,
                         train_fraction=recipe.train_fraction)
    per_epoch = steps_per_epoch(cfg, dataset, stage)
    tracker.set_tags(run_id, {"limpq.steps_per_epoch": per_epoch})
    loop_config: dict[str, Any] = {
        "pipeline": cfg, "stage": stage, "steps_per_epoch": per_epoch, "tracker": tracker, "run_id": run_id,
        "label": label or stage, "data": ray.put(data), **(inputs or {}),
    }
    def trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=_scaling(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_name,
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
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / STATE_FILE)["model"], dict(result.metrics or {})


def log_dataset_inputs(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str, stage: str) -> None:
    """Lineage of the data a training run read: the dataset's location, content digest and sizes,
    once for its training subset and once for the validation split."""
    fingerprint = dataset.fingerprint
    name = dataset.source.rstrip("/").rsplit("/", 1)[-1] or dataset.source
    fraction = stage_recipe(cfg, stage).train_fraction
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


def run_fp(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str, directory: Path,
           train_name: str) -> Path:
    """The FP stage into `directory`: trained on Ray Train, or taken from torchvision/a checkpoint."""
    ensure_ray(cfg)
    model = initial_fp_model(cfg.model, cfg.fp, cfg.seed)
    if cfg.fp.source == "train" and cfg.fp.epochs > 0:
        log_dataset_inputs(cfg, dataset, tracker, run_id, "fp")
        state, _ = train_on_ray(cfg, dataset, "fp", tracker, run_id, train_name)
        restore_model(model, state, "final FP checkpoint")
    out = save_checkpoint(directory / FP_FILE, model, meta=fp_meta(cfg.model))
    tracker.client.log_artifact(run_id, str(out), "checkpoint")
    log_model(tracker, run_id, model, example_input(cfg), name="fp-model",
              step=max(cfg.fp.epochs, 1) if cfg.fp.source == "train" else 0,
              tags={"limpq.stage": "fp", "limpq.arch": cfg.model.arch})
    return out


def run_indicators_training(cfg: PipelineConfig, dataset: DatasetIndex, tracker: Tracker, run_id: str,
                            directory: Path, fp_path: Path, train_name: str) -> Path:
    """Joint indicator training on Ray Train into `directory`: joint.pt, indicators.json, a heatmap,
    all logged to `run_id`, with the joint model as an MLflow model."""
    ensure_ray(cfg)
    log_dataset_inputs(cfg, dataset, tracker, run_id, "indicators")
    inputs = {"fp_weights": ray.put(load_checkpoint(fp_path)["model"])}
    state, _ = train_on_ray(cfg, dataset, "indicators", tracker, run_id, train_name, inputs)
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
        tracker.client.log_artifact(run_id, str(path), folder)
    log_model(tracker, run_id, model, example_input(cfg), name="joint-model", step=cfg.indicators.epochs,
              tags={"limpq.stage": "indicators", "limpq.arch": cfg.model.arch,
                    "limpq.bits": ",".join(map(str, cfg.indicators.bits))})
    return out
