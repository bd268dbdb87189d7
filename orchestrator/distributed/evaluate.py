"""One-shot policy scoring with a config's finished joint model (SPEC 1.7): `limpq evaluate`, and the
sweep's trials when `finetune.epochs` is 0. As a Ray task when a cluster is there (RAY_ADDRESS or
ray.address), in-process otherwise.

Everything checkable is checked on the driver before Ray is touched: the finished indicator stage,
and that every policy fits the joint model (layer names, candidate bits).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import DatasetIndex, prepare_dataset
from orchestrator.data.local import build_datasets, split_dataset
from orchestrator.data.transforms import transforms_for
from orchestrator.distributed.runtime import ensure_ray
from orchestrator.tracking.stages import finished_stage
from orchestrator.common.errors import UserError
from orchestrator.checks.preflight import CheckedConfig
from orchestrator.quant.policy import BitAssignment, set_policy
from orchestrator.common.redact import redact
from orchestrator.search.costs import CostTable
from orchestrator.checks.stage_keys import stage_keys
from orchestrator.tracking.runs import Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.oneshot import (
    check_policy,
    loader_batches,
    recalibrate_bn,
    score_on_datasets,
)
from orchestrator.train.recipe import make_criterion
from orchestrator.train.stages import JOINT_FILE, device_for, untrained_joint_model

log = logging.getLogger("limpq")

Labelled = Sequence[tuple[str, BitAssignment]]


def finished_joint_checkpoint(cfg: PipelineConfig, dataset: DatasetIndex) -> Path:
    """joint.pt of the config's finished indicator stage, found as the pipeline finds it (by its stage
    key, downloaded from the run's artifacts when not present locally)."""
    tracker = Tracker.from_config(cfg)
    key = stage_keys(cfg, dataset.fingerprint).indicators
    indicators = finished_stage(cfg, tracker, "indicators", key)
    if indicators is None:
        raise UserError(f"no finished indicator training for config {cfg.name!r} (indicators stage key {key}) in "
                        f"MLflow at {redact(tracker.tracking_uri)}; run `limpq indicators train --config ...` "
                        "(or `limpq run`) first")
    return indicators.file(JOINT_FILE)


def score_on_this_node(cfg: PipelineConfig, dataset: DatasetIndex, costs: CostTable, state: dict,
                       policies: Labelled, calibration_batches: int = 0) -> list[dict]:
    """Rows of `orchestrator.train.oneshot.score_policies` of the joint model with weights `state` over
    the config's val split; with `calibration_batches` > 0 BN statistics are recalibrated on that many
    (seeded) training batches."""
    model = untrained_joint_model(cfg.model, cfg.indicators.bits)
    restore_model(model, state, "joint checkpoint")
    train_set, val_set = build_datasets(dataset, transforms_for(cfg.data, cfg.model.input_size), cfg.model.num_classes,
                                        cfg.seed, cfg.indicators.train_fraction)
    return score_on_datasets(model, policies, costs, train_set, val_set, batch_size=cfg.data.batch_size, seed=cfg.seed,
                             calibration_batches=calibration_batches, criterion=make_criterion(cfg.indicators),
                             bf16=cfg.training.bf16, device=device_for(cfg.ray.use_gpu))


def scored_joint_model(cfg: PipelineConfig, dataset: DatasetIndex, state: dict, policy: BitAssignment,
                       calibration_batches: int = 0) -> torch.nn.Module:
    """The joint model as `score_on_this_node` scores it at `policy`: its bits set and, with
    `calibration_batches`, BN statistics recomputed on the same seeded training batches (and kept).
    What a one-shot trial registers: the model its top-1 belongs to."""
    model = untrained_joint_model(cfg.model, cfg.indicators.bits)
    restore_model(model, state, "joint checkpoint")
    set_policy(model, policy)
    if calibration_batches:
        train_transform, _ = transforms_for(cfg.data, cfg.model.input_size)
        train_set = split_dataset(dataset, "train", train_transform, cfg.seed, cfg.indicators.train_fraction)
        recalibrate_bn(model, loader_batches(train_set, cfg.data.batch_size, cfg.seed, calibration_batches,
                                             shuffle=True))
    return model.eval()


def score_with_joint_model(checked: CheckedConfig, policies: Labelled, calibration_batches: int = 0) -> list[dict]:
    """Score every (label, policy) with the config's finished joint model; rows in the order given.
    Each policy must fit the joint model's layers and candidate bits (checked before any lookup)."""
    cfg = checked.config.with_absolute_paths()
    structure = untrained_joint_model(cfg.model, cfg.indicators.bits)
    for label, policy in policies:
        check_policy(structure, policy, label)
    dataset = checked.dataset or prepare_dataset(cfg.data)
    state = load_checkpoint(finished_joint_checkpoint(cfg, dataset))["model"]
    if not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return score_on_this_node(cfg, dataset, checked.costs, state, policies, calibration_batches)
    ensure_ray(cfg)
    task = ray.remote(score_on_this_node).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0)
    log.info("evaluate: scoring %d policies as a Ray task", len(policies))
    return ray.get(task.remote(cfg, dataset, checked.costs, ray.put(state), list(policies), calibration_batches))
