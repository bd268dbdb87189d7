"""The FP, joint indicator-training and fine-tuning stages: their models and training recipes as plain
functions of their config sections (`model`, a stage's recipe) and values, and one `Stage` object per
stage (`FP`, `INDICATORS`, `FINETUNE`) that says what sets it apart: its recipe, model, step,
partial-batch rule and validation.

Layer 1: they build models, optimizers and step functions; `orchestrator.train.loop` runs their
epochs, in one process or in each Ray Train worker on its own shard (orchestrator.distributed.train).
"""

from __future__ import annotations

import functools
import math
import random
from abc import ABC, abstractmethod
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
    PipelineConfig,
    RecipeConfig,
)
from orchestrator.common.errors import UserError
from orchestrator.models.info import build_configured_model
from orchestrator.quant.policy import BitAssignment, load_step_sizes, uniform_policy
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
    """The FP model quantized at a fixed per-layer policy (docs/method.md §10); with `joint_state` (the joint model
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
    """`compile_mode` (`training.compile`) decided for the device `model` is on, and the compiled pass
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


@dataclass(frozen=True)
class StageStart:
    """What a stage's model starts from beside the config: the FP weights (indicators, fine-tuning), and
    for fine-tuning its fixed policy and, optionally, the joint model's weights."""

    fp_weights: dict | None = None
    joint_weights: dict | None = None
    policy: BitAssignment | None = None


class Stage(ABC):
    """One training stage: what sets it apart from the others. The FP stage and fine-tuning take plain
    steps and drop an epoch's last partial batch; indicator training takes the joint step (docs/method.md §3),
    keeps that batch, as the reference does, and validates at every uniform bit-width."""

    name: str
    # the reference's indicator training keeps an epoch's last partial batch; the others drop it
    keep_partial_batch = False
    validation_metrics: tuple[str, ...] = ("loss", "top1", "top5")

    def recipe(self, cfg: PipelineConfig) -> RecipeConfig:
        return getattr(cfg, self.name)

    @abstractmethod
    def build_model(self, cfg: PipelineConfig, start: StageStart) -> nn.Module:
        """The stage's model before training (on the CPU)."""

    def training(self, model: nn.Module, cfg: PipelineConfig, steps_per_epoch: int) -> Training:
        """Optimizer, schedule and step of `model` (on its device, DDP-wrapped or not) under `cfg.training`."""
        return plain_training(model, self.recipe(cfg), steps_per_epoch, cfg.training.bf16, cfg.training.compile)

    def validation_policies(self, model: nn.Module, cfg: PipelineConfig) -> dict[str, BitAssignment | None]:
        """Metric-name suffix -> the policy validated under it (None: the model as it stands)."""
        return {"": None}

    def steps_per_epoch(self, images_per_worker: float, batch_size: int) -> int:
        """The schedule's length of one worker's epoch over `images_per_worker` images."""
        if self.keep_partial_batch:
            return math.ceil(images_per_worker / batch_size)
        return int(images_per_worker // batch_size)


class FPStage(Stage):
    name = "fp"

    def build_model(self, cfg: PipelineConfig, start: StageStart) -> nn.Module:
        return initial_fp_model(cfg.model, cfg.fp, cfg.seed)


class IndicatorStage(Stage):
    name = "indicators"
    keep_partial_batch = True
    validation_metrics = ("loss", "top1")

    def build_model(self, cfg: PipelineConfig, start: StageStart) -> nn.Module:
        return joint_from_fp(cfg.model, cfg.indicators.bits, start.fp_weights)

    def training(self, model: nn.Module, cfg: PipelineConfig, steps_per_epoch: int) -> Training:
        return joint_training(model, cfg.indicators, steps_per_epoch, cfg.seed, cfg.training.bf16,
                              cfg.training.compile)

    def validation_policies(self, model: nn.Module, cfg: PipelineConfig) -> dict[str, BitAssignment | None]:
        return {f"_w{b}": uniform_policy(model, b) for b in cfg.indicators.bits}


class FinetuneStage(Stage):
    name = "finetune"

    def build_model(self, cfg: PipelineConfig, start: StageStart) -> nn.Module:
        return finetune_model(cfg.model, cfg.indicators.bits, start.fp_weights, start.policy, start.joint_weights)


FP, INDICATORS, FINETUNE = FPStage(), IndicatorStage(), FinetuneStage()
STAGES = {stage.name: stage for stage in (FP, INDICATORS, FINETUNE)}
