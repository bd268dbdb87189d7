"""The models and training recipes of the FP, joint indicator-training and fine-tuning stages as
plain functions of their config sections (`model`, a stage's recipe) and values.

Layer 1: they build models, optimizers and step functions; the Ray Train workers
(orchestrator.distributed.train) drive them on their own shards.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.config.schema import (
    FPConfig,
    IndicatorConfig,
    ModelConfig,
    RecipeConfig,
)
from orchestrator.common.errors import UserError
from orchestrator.models.info import build_configured_model
from orchestrator.quant.policy import BitAssignment, load_step_sizes
from orchestrator.quant.surgery import quantize_model
from orchestrator.common.seeds import derived_seed
from orchestrator.train import recipe as recipes
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.compiled import CompileDecision, CompiledPass, CompileMode, decide_compile
from orchestrator.train.steps import forward_loss, joint_step, plain_step

FP_FILE, JOINT_FILE, INDICATORS_FILE = "fp.pt", "joint.pt", "indicators.json"


def device_for(use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise UserError("ray.use_gpu: true but CUDA is not available on this machine")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fp_meta(model: ModelConfig) -> dict[str, Any]:
    """What a checkpoint records about the model it holds."""
    return {"arch": model.arch, "num_classes": model.num_classes}


def load_fp_model(model: ModelConfig, path: str | Path) -> nn.Module:
    """The full-precision model of `model` with the weights of an FP checkpoint file."""
    payload = load_checkpoint(path)
    arch = payload["meta"].get("arch", model.arch)
    if arch != model.arch:
        raise UserError(f"{path}: checkpoint holds a {arch}, the config asks for model.arch {model.arch}")
    network = build_configured_model(model)
    restore_model(network, payload["model"], path)
    return network


def initial_fp_model(model: ModelConfig, fp: FPConfig, seed: int) -> nn.Module:
    """Starting point of the FP stage: torchvision weights, a user checkpoint, or a fresh init to train."""
    if fp.source == "torchvision":
        return build_configured_model(model, fp.weights)
    if fp.source == "checkpoint":
        return load_fp_model(model, fp.checkpoint)
    torch.manual_seed(seed)
    return build_configured_model(model)


def seed_epoch(seed: int, stage: str, rank: int, epoch: int) -> None:
    """Seeds torch's global generator, which dropout draws from, for one worker's epoch of a stage.
    Unseeded, it held state from earlier work in the process (data tasks seed it per image), and two
    runs of one mobilenet_v2 config differed. Per epoch, so that a run resumed from a checkpoint draws
    what an uninterrupted one would."""
    torch.manual_seed(derived_seed(seed, stage, rank, epoch))


def joint_model(model: ModelConfig, bits: Sequence[int], fp_model: nn.Module) -> nn.Module:
    """The FP model with every searchable layer holding a step size per candidate bit-width."""
    quantize_model(fp_model, bits=bits, input_size=model.input_size, fixed_layers=model.fixed_layers)
    return fp_model


def untrained_joint_model(model: ModelConfig, bits: Sequence[int]) -> nn.Module:
    """The joint model's structure (layer names, candidate bits) without trained weights."""
    return joint_model(model, bits, build_configured_model(model))


def joint_from_fp(model: ModelConfig, bits: Sequence[int], fp_state: dict) -> nn.Module:
    """The joint model at candidate `bits`, starting from FP weights (indicator training's start)."""
    network = build_configured_model(model)
    restore_model(network, fp_state, "FP weights")
    return joint_model(model, bits, network)


def finetune_model(model: ModelConfig, bits: Sequence[int], fp_state: dict, policy: BitAssignment,
                   joint_state: dict | None = None) -> nn.Module:
    """The FP model quantized at a fixed per-layer policy (SPEC 1.6); with `joint_state` (the joint model
    trained at candidate `bits`), its step sizes and BatchNorms start from the joint-trained values at
    the chosen bits."""
    network = build_configured_model(model)
    restore_model(network, fp_state, "FP weights")
    quantize_model(network, policy=policy, input_size=model.input_size, fixed_layers=model.fixed_layers)
    if joint_state is not None:
        joint = untrained_joint_model(model, bits)
        restore_model(joint, joint_state, "joint checkpoint")
        load_step_sizes(network, joint, policy)
    return network


@dataclass
class Training:
    """What one worker needs to train a stage: optimizer, schedule and a step function."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    compile: CompileDecision
    compiled: CompiledPass | None = None
    policy_rng: random.Random | None = None


def compiled_pass(model: nn.Module, criterion: nn.Module, compile_mode: CompileMode,
                  bf16: bool) -> tuple[CompileDecision, CompiledPass | None]:
    """`compile_mode` (`ray.compile`) decided for the device `model` is on, and the compiled pass
    when it compiles."""
    decision = decide_compile(compile_mode, next(model.parameters()).device.type)
    if not decision.enabled:
        return decision, None
    forward = functools.partial(forward_loss, model, criterion=criterion, bf16=bf16)
    return decision, CompiledPass(model, forward, fallback=compile_mode == "auto")


def plain_training(model: nn.Module, recipe: RecipeConfig, per_epoch: int, bf16: bool,
                   compile_mode: CompileMode = "off") -> Training:
    """FP training, or fine-tuning at a fixed policy."""
    optimizer = recipes.make_optimizer(model, recipe)
    criterion = recipes.make_criterion(recipe)
    decision, compiled = compiled_pass(model, criterion, compile_mode, bf16)
    step = functools.partial(plain_step, model, criterion=criterion, optimizer=optimizer,
                             grad_clip=recipe.grad_clip, bf16=bf16, compiled=compiled)
    return Training(optimizer, recipes.make_scheduler(optimizer, recipe, per_epoch), criterion, step, decision,
                    compiled)


def joint_training(model: nn.Module, recipe: IndicatorConfig, per_epoch: int, seed: int, bf16: bool,
                   compile_mode: CompileMode = "off") -> Training:
    optimizer = recipes.make_optimizer(model, recipe)
    criterion = recipes.make_criterion(recipe)
    policy_rng = random.Random(seed)
    decision, compiled = compiled_pass(model, criterion, compile_mode, bf16)
    step = functools.partial(joint_step, model, bits=recipe.bits, criterion=criterion, optimizer=optimizer,
                             policy_rng=policy_rng, grad_clip=recipe.grad_clip, bf16=bf16, compiled=compiled)
    return Training(optimizer, recipes.make_scheduler(optimizer, recipe, per_epoch), criterion, step, decision,
                    compiled, policy_rng)
