"""The models and training recipes of the FP, joint indicator-training and fine-tuning stages as
plain functions of the pipeline config.

Layer 1: they build models, optimizers and step functions from the config; the Ray Train workers
(orchestrator.distributed.train) drive them on their own shards.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.config import PipelineConfig, RecipeConfig
from orchestrator.errors import UserError
from orchestrator.indicators import Indicators
from orchestrator.modelinfo import build_configured_model
from orchestrator.quant.policy import Policy, extract_indicators, load_step_sizes
from orchestrator.quant.surgery import quantize_model
from orchestrator.seeds import derived_seed
from orchestrator.train import recipe as recipes
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.steps import joint_step, plain_step

FP_FILE, JOINT_FILE, INDICATORS_FILE = "fp.pt", "joint.pt", "indicators.json"


def stage_recipe(cfg: PipelineConfig, stage: str) -> RecipeConfig:
    return {"fp": cfg.fp, "indicators": cfg.indicators, "finetune": cfg.finetune}[stage]


def device_for(cfg: PipelineConfig) -> torch.device:
    if cfg.ray.use_gpu:
        if not torch.cuda.is_available():
            raise UserError("ray.use_gpu: true but CUDA is not available on this machine")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fp_meta(cfg: PipelineConfig) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "num_classes": cfg.model.num_classes}


def load_fp_model(cfg: PipelineConfig, path: str | Path) -> nn.Module:
    """The full-precision model of `cfg.model` with the weights of an FP checkpoint file."""
    payload = load_checkpoint(path)
    arch = payload["meta"].get("arch", cfg.model.arch)
    if arch != cfg.model.arch:
        raise UserError(f"{path}: checkpoint holds a {arch}, the config asks for model.arch {cfg.model.arch}")
    model = build_configured_model(cfg.model)
    restore_model(model, payload["model"], path)
    return model


def initial_fp_model(cfg: PipelineConfig) -> nn.Module:
    """Starting point of the FP stage: torchvision weights, a user checkpoint, or a fresh init to train."""
    if cfg.fp.source == "torchvision":
        return build_configured_model(cfg.model, cfg.fp.weights)
    if cfg.fp.source == "checkpoint":
        return load_fp_model(cfg, cfg.fp.checkpoint)
    torch.manual_seed(cfg.seed)
    return build_configured_model(cfg.model)


def seed_epoch(seed: int, stage: str, rank: int, epoch: int) -> None:
    """Seeds torch's global generator, which dropout draws from, for one worker's epoch of a stage.
    Unseeded, it held state from earlier work in the process (data tasks seed it per image), and two
    runs of one mobilenet_v2 config differed. Per epoch, so that a run resumed from a checkpoint draws
    what an uninterrupted one would."""
    torch.manual_seed(derived_seed(seed, stage, rank, epoch))


def joint_model(cfg: PipelineConfig, fp_model: nn.Module) -> nn.Module:
    """The FP model with every searchable layer holding a step size per candidate bit-width."""
    quantize_model(fp_model, bits=cfg.indicators.bits, input_size=cfg.model.input_size,
                   fixed_layers=cfg.model.fixed_layers)
    return fp_model


def finetune_model(cfg: PipelineConfig, fp_state: dict, policy: Policy, joint_state: dict | None = None) -> nn.Module:
    """The FP model quantized at a fixed per-layer policy (SPEC 1.6); with `joint_state`, its step sizes
    and BatchNorms start from the joint-trained values at the chosen bits."""
    model = build_configured_model(cfg.model)
    restore_model(model, fp_state, "FP weights")
    quantize_model(model, policy=policy, input_size=cfg.model.input_size, fixed_layers=cfg.model.fixed_layers)
    if joint_state is not None:
        joint = joint_model(cfg, build_configured_model(cfg.model))
        restore_model(joint, joint_state, "joint checkpoint")
        load_step_sizes(model, joint, policy)
    return model


@dataclass
class Training:
    """What one worker needs to train a stage: optimizer, schedule and a step function."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    policy_rng: random.Random | None = None


def fp_training(cfg: PipelineConfig, model: nn.Module, per_epoch: int, recipe: RecipeConfig | None = None) -> Training:
    recipe = recipe or cfg.fp
    optimizer = recipes.make_optimizer(model, recipe)
    criterion = recipes.make_criterion(recipe)
    step = functools.partial(plain_step, model, criterion=criterion, optimizer=optimizer,
                             grad_clip=recipe.grad_clip, bf16=cfg.ray.bf16)
    return Training(optimizer, recipes.make_scheduler(optimizer, recipe, per_epoch), criterion, step)


def joint_training(cfg: PipelineConfig, model: nn.Module, per_epoch: int) -> Training:
    recipe = cfg.indicators
    optimizer = recipes.make_optimizer(model, recipe)
    criterion = recipes.make_criterion(recipe)
    policy_rng = random.Random(cfg.seed)
    step = functools.partial(joint_step, model, bits=recipe.bits, criterion=criterion, optimizer=optimizer,
                             policy_rng=policy_rng, grad_clip=recipe.grad_clip, bf16=cfg.ray.bf16)
    return Training(optimizer, recipes.make_scheduler(optimizer, recipe, per_epoch), criterion, step, policy_rng)


def indicators_of(cfg: PipelineConfig, model: nn.Module, run_id: str | None = None) -> Indicators:
    return extract_indicators(model, cfg.model.arch, provenance={
        "run_id": run_id, "pipeline": cfg.name, "epochs": cfg.indicators.epochs,
        "train_fraction": cfg.indicators.train_fraction, "data": cfg.data.path, "input_size": cfg.model.input_size,
    })
