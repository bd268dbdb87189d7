"""One-shot policy scoring with the joint model (SPEC 1.7): any policy is run on the joint-trained
model directly, each layer with its step sizes at the chosen bits and the matching BN copy.

Layer 1: plain torch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from orchestrator.config import PipelineConfig
from orchestrator.modelinfo import build_model
from orchestrator.quant.policy import Policy
from orchestrator.train.checkpoint import restore_model
from orchestrator.train.stages import joint_model
from orchestrator.train.steps import evaluate


def joint_model_from_state(cfg: PipelineConfig, state: dict) -> nn.Module:
    model = joint_model(cfg, build_model(cfg.model.arch, cfg.model.num_classes))
    restore_model(model, state, "joint checkpoint")
    return model.eval()


def score_policy(model: nn.Module, policy: Policy, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return evaluate(model, batches, nn.CrossEntropyLoss(), policy)
