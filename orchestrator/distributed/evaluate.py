"""`limpq evaluate` behind the CLI: score policies with a config's finished joint model (SPEC 1.7),
as a Ray task when a cluster is there (RAY_ADDRESS or ray.address), in-process otherwise.

Everything checkable is checked on the driver before Ray is touched: the finished indicator stage,
and that every policy fits the joint model (layer names, candidate bits).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from orchestrator.config import PipelineConfig
from orchestrator.errors import UserError
from orchestrator.modelinfo import build_configured_model
from orchestrator.quant.policy import Policy
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.stages import JOINT_FILE, device_for, joint_model

log = logging.getLogger("limpq")

Labelled = Sequence[tuple[str, Policy]]


def finished_joint_checkpoint(cfg: PipelineConfig) -> Path:
    """joint.pt of the config's finished indicator stage, found as the pipeline finds it (by its stage
    key, downloaded from the run's artifacts when not present locally)."""
    from orchestrator.distributed.pipeline import finished_stage
    from orchestrator.redact import redact
    from orchestrator.stagekeys import stage_keys
    from orchestrator.tracking import Tracker

    tracker = Tracker.from_config(cfg)
    key = stage_keys(cfg).indicators
    indicators = finished_stage(cfg, tracker, "indicators", key)
    if indicators is None:
        raise UserError(f"no finished indicator training for config {cfg.name!r} (indicators stage key {key}) in "
                        f"MLflow at {redact(tracker.tracking_uri)}; run `limpq indicators train --config ...` "
                        "(or `limpq run`) first")
    return indicators.file(JOINT_FILE)


def policy_from_file(path: str | Path) -> Policy:
    """{layer: (wbits, abits)} of a policy JSON v1 file (UserError when it is not one)."""
    from orchestrator.search.policy import load_policy

    return {layer.name: (layer.wbits, layer.abits) for layer in load_policy(path).layers}


def untrained_joint(cfg: PipelineConfig) -> torch.nn.Module:
    """The joint model's structure (its layer names and candidate bits), without weights."""
    return joint_model(cfg, build_configured_model(cfg.model))


def load_joint(cfg: PipelineConfig, state: dict) -> torch.nn.Module:
    model = untrained_joint(cfg)
    restore_model(model, state, "joint checkpoint")
    return model


def score_on_this_node(cfg: PipelineConfig, state: dict, policies: Labelled, calibration_batches: int = 0) -> list[dict]:
    """Rows of `orchestrator.train.oneshot.score_policies` over the config's val split; with
    `calibration_batches` > 0 BN statistics are recalibrated on that many (seeded) training batches."""
    from torch.utils.data import DataLoader

    from orchestrator.data.local import build_datasets
    from orchestrator.search.policy import config_cost_table
    from orchestrator.train.oneshot import score_policies
    from orchestrator.train.recipe import make_criterion

    device = device_for(cfg)
    model = load_joint(cfg, state).to(device)
    train_set, val_set = build_datasets(cfg, cfg.indicators.train_fraction)

    def batches(dataset, count: int | None = None, shuffle: bool = False):
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=shuffle, generator=generator)
        for index, (images, labels) in enumerate(loader):
            if count is not None and index >= count:
                return
            yield images.to(device), labels.to(device)

    calibration = (lambda: batches(train_set, calibration_batches, shuffle=True)) if calibration_batches else None
    return score_policies(model, policies, config_cost_table(cfg), lambda: batches(val_set), calibration,
                          make_criterion(cfg.indicators), cfg.ray.bf16)


def evaluate_policies(cfg: PipelineConfig, policies: Labelled, calibration_batches: int = 0) -> list[dict]:
    """Score every (label, policy) with the config's finished joint model; rows in the order given."""
    from orchestrator.train.oneshot import check_policy

    cfg = cfg.with_absolute_paths()
    model = untrained_joint(cfg)  # checked against the layout before any lookup
    for label, policy in policies:
        check_policy(model, policy, label)
    del model
    state = load_checkpoint(finished_joint_checkpoint(cfg))["model"]
    import ray

    if not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return score_on_this_node(cfg, state, policies, calibration_batches)
    from orchestrator.distributed.runtime import ensure_ray

    ensure_ray(cfg)
    task = ray.remote(score_on_this_node).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0)
    log.info("evaluate: scoring %d policies as a Ray task", len(policies))
    return ray.get(task.remote(cfg, ray.put(state), list(policies), calibration_batches))
