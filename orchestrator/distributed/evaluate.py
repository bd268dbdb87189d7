"""One-shot policy scoring with a config's finished joint model (docs/method.md §9): `limpq evaluate`, and the
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

from orchestrator.checks.preflight import CheckedConfig
from orchestrator.common.errors import UserError
from orchestrator.common.redact import redact
from orchestrator.data.local import build_datasets, split_dataset
from orchestrator.data.transforms import transforms_for
from orchestrator.distributed.runtime import ensure_ray
from orchestrator.quant.policy import BitAssignment, set_policy
from orchestrator.tracking.context import RunContext
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.oneshot import (
    ScoringData,
    check_policy,
    loader_batches,
    recalibrate_bn,
    score_policies,
)
from orchestrator.train.recipe import make_criterion
from orchestrator.train.stages import JOINT_FILE, device_for, untrained_joint_model

log = logging.getLogger("limpq")

Labelled = Sequence[tuple[str, BitAssignment]]


def finished_joint_checkpoint(context: RunContext) -> Path:
    """joint.pt of the config's finished indicator stage, found as the pipeline finds it (by its stage
    key, downloaded from the run's artifacts when not present locally)."""
    indicators = context.finished_stage("indicators", context.keys.indicators)
    if indicators is None:
        raise UserError(f"no finished indicator training for config {context.cfg.name!r} (indicators stage key "
                        f"{context.keys.indicators}) in MLflow at {redact(context.tracker.tracking_uri)}; run `limpq "
                        "indicators train --config ...` (or `limpq run`) first")
    return indicators.file(JOINT_FILE)


def _joint_model(context: RunContext, state: dict) -> torch.nn.Module:
    model = untrained_joint_model(context.cfg.model, context.cfg.indicators.bits)
    restore_model(model, state, "joint checkpoint")
    return model


def score_joint_weights_here(context: RunContext, state: dict, policies: Labelled,
                             calibration_batches: int = 0) -> list[dict]:
    """`orchestrator.train.oneshot.score_policies` rows of the joint model with weights `state`, in this
    process, over the config's val split; with `calibration_batches` > 0 BN statistics are recalibrated
    on that many (seeded) training batches."""
    cfg = context.cfg
    train_set, val_set = build_datasets(context.dataset, transforms_for(cfg.data, cfg.model.input_size),
                                        cfg.model.num_classes, cfg.seed, cfg.indicators.train_fraction)
    data = ScoringData(train_set, val_set, batch_size=cfg.data.batch_size, seed=cfg.seed,
                       calibration_batches=calibration_batches, device=device_for(cfg.ray.use_gpu))
    return score_policies(_joint_model(context, state), policies, context.costs, data,
                          criterion=make_criterion(cfg.indicators), bf16=cfg.training.bf16)


def joint_model_at_policy(context: RunContext, state: dict, policy: BitAssignment,
                          calibration_batches: int = 0) -> torch.nn.Module:
    """The joint model as `score_joint_weights_here` scores it at `policy`: its bits set and, with
    `calibration_batches`, BN statistics recomputed on the same seeded training batches (and kept).
    What a one-shot trial registers: the model its top-1 belongs to."""
    cfg = context.cfg
    model = _joint_model(context, state)
    set_policy(model, policy)
    if calibration_batches:
        train_transform, _ = transforms_for(cfg.data, cfg.model.input_size)
        train_set = split_dataset(context.dataset, "train", train_transform, cfg.seed, cfg.indicators.train_fraction)
        recalibrate_bn(model, loader_batches(train_set, cfg.data.batch_size, cfg.seed, calibration_batches,
                                             shuffle=True))
    return model.eval()


def score_with_finished_joint_model(checked: CheckedConfig, policies: Labelled,
                                    calibration_batches: int = 0) -> list[dict]:
    """`limpq evaluate`: score every (label, policy) with the config's finished joint model, in this
    process or as a Ray task; rows in the order given. Each policy must fit the joint model's layers
    and candidate bits (checked before any lookup)."""
    structure = untrained_joint_model(checked.config.model, checked.config.indicators.bits)
    for label, policy in policies:
        check_policy(structure, policy, label)
    context = RunContext.start(checked)
    state = load_checkpoint(finished_joint_checkpoint(context))["model"]
    cfg = context.cfg
    if not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return score_joint_weights_here(context, state, policies, calibration_batches)
    ensure_ray(cfg)
    task = ray.remote(score_joint_weights_here).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0)
    log.info("evaluate: scoring %d policies as a Ray task", len(policies))
    return ray.get(task.remote(context, ray.put(state), list(policies), calibration_batches))
