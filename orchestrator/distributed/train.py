"""FP and joint indicator training on Ray Train (TorchTrainer), fed by the ray.data pipeline and
recorded in MLflow.

The driver opens the stage's MLflow run and logs the config; the rank-0 worker logs per-epoch
metrics while training runs (the driver is blocked in `fit()` meanwhile, so one process at a time
writes the run); after training the driver logs the artifacts and closes the run. Checkpoints go
through `ray.train.report` every epoch, so a lost worker restarts the group from the last one
(FailureConfig), and submitting the same run name again resumes a crashed job (Train V2 restores
a run from its (storage_path, name)).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.config import PipelineConfig
from orchestrator.data.layout import dataset_root, in_fraction, list_classes, list_folder_split, list_parquet_shards
from orchestrator.data.ray_pipeline import SkipCounter, build_ray_datasets, iter_batches
from orchestrator.distributed.runtime import TRAIN_LOGGING, ensure_ray
from orchestrator.indicators import save_indicators
from orchestrator.modelinfo import build_model
from orchestrator.plots import indicator_heatmap
from orchestrator.quant.policy import uniform_policy
from orchestrator.tracking import Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from orchestrator.train.loop import MetricSums
from orchestrator.train.progress import Progress
from orchestrator.train.stages import (
    FP_FILE, INDICATORS_FILE, JOINT_FILE, finetune_model, fp_meta, fp_training, indicators_of, initial_fp_model,
    joint_model, joint_training, stage_recipe,
)
from orchestrator.train.steps import evaluate

log = logging.getLogger("limpq")

STATE_FILE = "state.pt"
CRASH_ENV = "LIMPQ_TEST_CRASH_AT_STEP"  # test-only fault injection: "<global step>:<marker file>"


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


def _maybe_crash(global_step: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    step, marker = spec.split(":", 1)
    if global_step == int(step) and not Path(marker).exists() and ray.train.get_context().get_world_rank() == 0:
        Path(marker).touch()
        log.warning("test fault injection: worker exits at step %d", global_step)
        os._exit(1)


def _validation(model, cfg: PipelineConfig, stage: str, criterion, device) -> dict[str, float]:
    """Validation over every worker's share of the val set, aggregated by sample count: at every
    uniform bit-width for the joint model, else as the model stands (FP, or its fixed policy)."""
    shard = ray.train.get_dataset_shard("val")
    policies = {f"_w{b}": uniform_policy(model, b) for b in cfg.indicators.bits} if stage == "indicators" else {"": None}
    metrics = {}
    for suffix, policy in policies.items():
        result = evaluate(model, iter_batches(shard, cfg.data.batch_size, device), criterion, policy, cfg.ray.bf16)
        n = result["samples"]
        sums = _all_reduce([result[k] * n if n else 0.0 for k in ("loss", "top1", "top5")] + [float(n)])
        for key, total in zip(("loss", "top1", "top5"), sums):
            if key != "top5" or stage != "indicators":
                metrics[f"val_{key}{suffix}"] = total / max(sums[-1], 1)
    return metrics


def _worker_model(cfg: PipelineConfig, stage: str, config: dict[str, Any]) -> torch.nn.Module:
    if stage == "fp":
        return initial_fp_model(cfg)
    fp_state = ray.get(config["fp_weights"])
    if stage == "finetune":
        joint_state = ray.get(config["joint_weights"]) if config.get("joint_weights") is not None else None
        return finetune_model(cfg, fp_state, config["policy"], joint_state)
    model = build_model(cfg.model.arch, cfg.model.num_classes)
    restore_model(model, fp_state, "FP weights")
    return joint_model(cfg, model)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of the FP, indicator or fine-tuning stage."""
    cfg: PipelineConfig = config["pipeline"]
    stage: str = config["stage"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
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
    training = (joint_training(cfg, model, per_epoch) if stage == "indicators"
                else fp_training(cfg, model, per_epoch, recipe))
    start_epoch = 0
    if payload is not None:
        training.optimizer.load_state_dict(payload["optimizer"])
        training.scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], training.policy_rng)
        start_epoch = payload["epoch"]
        log.info("%s: resuming at epoch %d from the last checkpoint", stage, start_epoch + 1)

    tracker: Tracker | None = config.get("tracker") if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    progress = Progress(stage, recipe.epochs, per_epoch, bar=tqdm_ray.tqdm, enabled=rank == 0)
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        sums, started, images = MetricSums(), time.monotonic(), 0
        batches = iter_batches(shard, cfg.data.batch_size, device, drop_last=True)
        for step in range(per_epoch):
            batch = next(batches, None)
            if not _every_worker_has_batch(batch is not None):
                break
            _maybe_crash(epoch * per_epoch + step)
            x, y = batch
            metrics = training.step(x, y)
            training.scheduler.step()
            sums.add(metrics, len(y))
            images += len(y)
            progress.update(epoch, step, len(y), metrics)
        for _ in batches:  # drain: the shard iterator must finish before the next epoch starts
            pass
        progress.close()  # the epoch's bar ends with its steps, before validation
        seconds = time.monotonic() - started
        metrics = _mean_across_workers(sums.means())
        metrics["images_per_second"] = _all_reduce([images / max(seconds, 1e-9)])[0]
        metrics.update(_validation(model, cfg, stage, training.criterion, device))
        metrics["epoch"] = epoch + 1
        metrics.update(config.get("report_extra", {}))
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(directory) / STATE_FILE, model, optimizer=training.optimizer,
                                scheduler=training.scheduler, epoch=epoch + 1, policy_rng=training.policy_rng,
                                meta=fp_meta(cfg))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                if tracker is not None:
                    tracker.log_metrics(config["run_id"], metrics, step=epoch + 1)
            ray.train.report(metrics, checkpoint=checkpoint)


def _scaling(cfg: PipelineConfig) -> ScalingConfig:
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources)


def storage_path(cfg: PipelineConfig) -> str:
    """Ray's storage path: URIs as given, local paths absolute (trials run in other directories)."""
    path = cfg.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


def _estimated_steps(cfg: PipelineConfig, fraction: float) -> int:
    """Steps per epoch from the file listing (reading no image): the schedule's length. The loop
    itself stops at the shortest shard, so skipped images only end an epoch a step early."""
    root = dataset_root(cfg)
    if cfg.data.format == "folder":
        split = list_folder_split(root / "train", list_classes(root / "train"))
        samples = sum(in_fraction(key, fraction, cfg.seed) for key in split.keys)
    else:
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(shard).metadata.num_rows for shard in list_parquet_shards(root / "train"))
        samples = int(rows * fraction)
    return max(1, samples // cfg.ray.num_workers // cfg.data.batch_size)


def train_on_ray(cfg: PipelineConfig, stage: str, tracker: Tracker, run_id: str, run_name: str,
                 inputs: dict[str, Any] | None = None, callbacks: list | None = None) -> dict:
    """Run one stage's TorchTrainer (FP, indicators or fine-tuning) and return the final model state.

    `inputs` go to every worker (object refs of weights, a policy); the same `run_name` under the
    same storage path resumes a crashed run from its last checkpoint. The skipped-image count and
    steps per epoch are logged to `run_id`.
    """
    ensure_ray(cfg)
    recipe = stage_recipe(cfg, stage)
    counter = SkipCounter()
    datasets = build_ray_datasets(cfg, skip_counter=counter, train_fraction=recipe.train_fraction)
    per_epoch = _estimated_steps(cfg, recipe.train_fraction)
    tracker.log_params(run_id, {"steps_per_epoch": per_epoch})
    loop_config: dict[str, Any] = {
        "pipeline": cfg, "stage": stage, "steps_per_epoch": per_epoch, "tracker": tracker, "run_id": run_id,
        **(inputs or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=TRAIN_LOGGING,
        ),
    )
    result = trainer.fit()
    skipped = counter.counts()
    tracker.log_metrics(run_id, {f"skipped_images_{split}": n for split, n in skipped.items()}, step=recipe.epochs)
    if any(skipped.values()):
        log.warning("skipped unreadable images: %s", skipped)
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / STATE_FILE)["model"]


def run_stage(cfg: PipelineConfig, stage: str, tracker: Tracker, fp_path: Path | None = None) -> Path:
    """Run the FP or indicator stage on Ray Train; returns the stage's output file.

    Writes `<run_dir>/fp.pt`, or `joint.pt` + `indicators.json`; MLflow gets the params, per-epoch
    metrics, images/s, the skipped-image count and the artifacts.
    """
    ensure_ray(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"fp_weights": ray.put(load_checkpoint(fp_path)["model"])} if stage == "indicators" else {}
    with tracker.open_stage_run(cfg, stage, config_hash=cfg.stage_hash(stage)) as run:
        state = train_on_ray(cfg, stage, tracker, run.run_id, f"{cfg.name}-{stage}-{cfg.stage_hash(stage)}", inputs)
        return _write_outputs(cfg, stage, state, tracker, run.run_id, cfg.run_dir)


def _write_outputs(cfg: PipelineConfig, stage: str, state: dict, tracker: Tracker, run_id: str, out_dir: Path) -> Path:
    if stage == "fp":
        model = build_model(cfg.model.arch, cfg.model.num_classes)
        restore_model(model, state, "final FP checkpoint")
        out = save_checkpoint(out_dir / FP_FILE, model, meta=fp_meta(cfg))
        tracker.log_artifact(run_id, out, "checkpoint")
        return out
    model = joint_model(cfg, build_model(cfg.model.arch, cfg.model.num_classes))
    restore_model(model, state, "final joint checkpoint")
    joint = save_checkpoint(out_dir / JOINT_FILE, model, meta=fp_meta(cfg))
    indicators = indicators_of(cfg, model, run_id)
    out = out_dir / INDICATORS_FILE
    save_indicators(indicators, out)
    heatmap = out_dir / "indicators.png"
    indicator_heatmap(indicators.layers, indicators.bits,
                      [[indicators.weight[n][b] for b in indicators.bits] for n in indicators.layers],
                      [[indicators.act[n][b] for b in indicators.bits] for n in indicators.layers],
                      heatmap, title=f"{cfg.model.arch} step sizes ({cfg.name})")
    for path, folder in ((out, None), (heatmap, "plots"), (joint, "checkpoint")):
        tracker.log_artifact(run_id, path, folder)
    return out

