"""The FP and joint indicator-training stages as plain functions of the pipeline config.

Layer 1: they build models, optimizers and step functions from the config. In-process runners
(`run_fp_stage`, `run_indicator_stage`) drive them with `loop.fit`; the Ray Train workers
(orchestrator.distributed) call the same builders on their own shards.
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
from orchestrator.indicators import Indicators, save_indicators
from orchestrator.modelinfo import build_model
from orchestrator.quant.policy import Policy, extract_indicators, load_step_sizes, uniform_policy
from orchestrator.quant.surgery import quantize_model
from orchestrator.train import recipe as recipes
from orchestrator.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from orchestrator.train.loop import fit, steps_per_epoch
from orchestrator.train.steps import evaluate, joint_step, plain_step

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
    return {"arch": cfg.model.arch, "num_classes": cfg.model.num_classes, "config_hash": cfg.config_hash()}


def load_fp_model(cfg: PipelineConfig, path: str | Path) -> nn.Module:
    """The full-precision model of `cfg.model` with the weights of an FP checkpoint file."""
    payload = load_checkpoint(path)
    arch = payload["meta"].get("arch", cfg.model.arch)
    if arch != cfg.model.arch:
        raise UserError(f"{path}: checkpoint holds a {arch}, the config asks for model.arch {cfg.model.arch}")
    model = build_model(cfg.model.arch, cfg.model.num_classes)
    restore_model(model, payload["model"], path)
    return model


def initial_fp_model(cfg: PipelineConfig) -> nn.Module:
    """Starting point of the FP stage: torchvision weights, a user checkpoint, or a fresh init to train."""
    if cfg.fp.source == "torchvision":
        return build_model(cfg.model.arch, cfg.model.num_classes, cfg.fp.weights)
    if cfg.fp.source == "checkpoint":
        return load_fp_model(cfg, cfg.fp.checkpoint)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.arch, cfg.model.num_classes)


def joint_model(cfg: PipelineConfig, fp_model: nn.Module) -> nn.Module:
    """The FP model with every searchable layer holding a step size per candidate bit-width."""
    quantize_model(fp_model, bits=cfg.indicators.bits, input_size=cfg.model.input_size,
                   fixed_layers=cfg.model.fixed_layers)
    return fp_model


def finetune_model(cfg: PipelineConfig, fp_state: dict, policy: Policy, joint_state: dict | None = None) -> nn.Module:
    """The FP model quantized at a fixed per-layer policy (SPEC 1.6); with `joint_state`, its step sizes
    and BatchNorms start from the joint-trained values at the chosen bits."""
    model = build_model(cfg.model.arch, cfg.model.num_classes)
    restore_model(model, fp_state, "FP weights")
    quantize_model(model, policy=policy, input_size=cfg.model.input_size, fixed_layers=cfg.model.fixed_layers)
    if joint_state is not None:
        joint = joint_model(cfg, build_model(cfg.model.arch, cfg.model.num_classes))
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


def evaluate_joint(model: nn.Module, batches_fn: Callable[[], Any], criterion: nn.Module, bits: list[int],
                   bf16: bool = False) -> dict[str, float]:
    """Validation top-1 and loss at every uniform bit-width."""
    metrics = {}
    for b in bits:
        result = evaluate(model, batches_fn(), criterion, uniform_policy(model, b), bf16)
        metrics[f"val_top1_w{b}"], metrics[f"val_loss_w{b}"] = result["top1"], result["loss"]
    return metrics


def indicators_of(cfg: PipelineConfig, model: nn.Module, run_id: str | None = None) -> Indicators:
    return extract_indicators(model, cfg.model.arch, provenance={
        "run_id": run_id, "pipeline": cfg.name, "config_hash": cfg.config_hash(), "epochs": cfg.indicators.epochs,
        "train_fraction": cfg.indicators.train_fraction, "data": cfg.data.path, "input_size": cfg.model.input_size,
    })


def _val_batches(val_set, batch_size: int, device: torch.device):
    from torch.utils.data import DataLoader

    for images, labels in DataLoader(val_set, batch_size=batch_size):
        yield images.to(device), labels.to(device)


def run_fp_stage(cfg: PipelineConfig) -> Path:
    """In-process FP stage; writes `<run_dir>/fp.pt` and returns its path (kept if it already exists)."""
    out = cfg.run_dir / FP_FILE
    if out.exists():
        return out
    model = initial_fp_model(cfg)
    if cfg.fp.source == "train" and cfg.fp.epochs > 0:
        from orchestrator.data.local import build_datasets

        device = device_for(cfg)
        model.to(device)
        train_set, val_set = build_datasets(cfg, cfg.fp.train_fraction)
        per_epoch = steps_per_epoch(len(train_set), cfg.data.batch_size)
        training = fp_training(cfg, model, per_epoch)
        fit(model, train_set, cfg.fp, stage="fp", step_fn=training.step, optimizer=training.optimizer,
            scheduler=training.scheduler, batch_size=cfg.data.batch_size, seed=cfg.seed, device=device,
            checkpoint_path=cfg.run_dir / "fp_state.pt", num_workers=cfg.data.num_workers, meta=fp_meta(cfg),
            on_epoch_end=lambda epoch, _: {
                f"val_{k}": v for k, v in evaluate(model, _val_batches(val_set, cfg.data.batch_size, device),
                                                   training.criterion).items() if k != "samples"})
        model.cpu()
    save_checkpoint(out, model, meta=fp_meta(cfg))
    return out


def run_indicator_stage(cfg: PipelineConfig, fp_path: str | Path, stop_after_steps: int | None = None) -> Path | None:
    """In-process joint indicator training; writes `<run_dir>/joint.pt` and `indicators.json`.

    Resumes from `<run_dir>/joint_state.pt`. Returns the indicators path, or None when stopped early.
    """
    from orchestrator.data.local import build_datasets

    device = device_for(cfg)
    model = joint_model(cfg, load_fp_model(cfg, fp_path)).to(device)
    train_set, val_set = build_datasets(cfg, cfg.indicators.train_fraction)
    per_epoch = steps_per_epoch(len(train_set), cfg.data.batch_size)
    training = joint_training(cfg, model, per_epoch)
    result = fit(
        model, train_set, cfg.indicators, stage="indicators", step_fn=training.step, optimizer=training.optimizer,
        scheduler=training.scheduler, batch_size=cfg.data.batch_size, seed=cfg.seed, device=device,
        checkpoint_path=cfg.run_dir / "joint_state.pt", policy_rng=training.policy_rng,
        num_workers=cfg.data.num_workers, checkpoint_every_steps=cfg.indicators.checkpoint_every_steps,
        meta=fp_meta(cfg), stop_after_steps=stop_after_steps,
        on_epoch_end=lambda epoch, _: evaluate_joint(
            model, lambda: _val_batches(val_set, cfg.data.batch_size, device), training.criterion,
            cfg.indicators.bits, cfg.ray.bf16),
    )
    if not result.finished:
        return None
    save_checkpoint(cfg.run_dir / JOINT_FILE, model, meta=fp_meta(cfg))
    out = cfg.run_dir / INDICATORS_FILE
    save_indicators(indicators_of(cfg, model), out)
    return out
