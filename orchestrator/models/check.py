"""Run a model through every stage of the pipeline in-process, on one random batch: trace and costs,
the joint model and one joint-training step (docs/method.md §3), indicators and one search (docs/method.md §7), the
fine-tuning model at the searched policy and one fine-tuning step (docs/method.md §10).

It uses the stages' own functions (orchestrator.train.stages, the search), without Ray, MLflow or data,
so it answers in seconds to minutes whether a model, e.g. a user's own, goes through the pipeline,
before a cluster is asked for. `limpq model check` prints it; the model-zoo benchmark and the CI run
it per model family.

Layer 1: plain torch and the search (no Ray, no MLflow).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orchestrator.config.schema import Budget, PipelineConfig
from orchestrator.common.errors import UserError
from orchestrator.models.user_module import error_summary
from orchestrator.quant.policy import extract_indicators
from orchestrator.search.costs import cost_table
from orchestrator.search.ilp import Searcher
from orchestrator.train.stages import (
    finetune_model,
    initial_fp_model,
    joint_model,
    joint_training,
    plain_training,
)

STAGES = ("trace", "joint_step", "search", "finetune_step")


@dataclass
class ModelCheck:
    arch: str
    input_size: int
    passed: list[str] = field(default_factory=list)  # stages that ran, in order
    failed: str | None = None  # the stage that raised (the ones after it did not run)
    error: str | None = None  # what it raised, on one line
    total_macs: int | None = None
    quantized_share: float | None = None
    searchable_layers: int | None = None
    float_ops: int | None = None
    joint_loss: float | None = None  # the last uniform pass's loss of the joint step
    policy_bitops_g: float | None = None  # the searched policy's BitOps (searchable layers)
    finetune_loss: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    @property
    def ok(self) -> bool:
        return self.failed is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_check_config(arch: str, input_size: int, num_classes: int = 10, kwargs: dict | None = None,
                       bits: tuple[int, ...] = (4, 2)) -> PipelineConfig:
    """A config for `check_model_stages`: the model, its candidate bits, and a BitOps budget halfway
    between uniform lowest and highest bits (so the search has to mix them). The learning rates are
    a tenth of the recipes' defaults: one step on random labels from a random initialisation has
    gradients far above a trained model's, and at 0.01 it moves many small step sizes below the
    quantizer's floor; the check is about the code path, not the recipe."""
    return PipelineConfig.model_validate({
        "model": {"arch": arch, "num_classes": num_classes, "input_size": input_size, "kwargs": dict(kwargs or {}),
                  "min_quantized_share": 0.0},
        "indicators": {"bits": list(bits), "lr": 1e-3},
        "search": {"budgets": [_middle_budget(bits)]},
        "finetune": {"lr": 1e-3},
    })


def _middle_budget(bits: Sequence[int]) -> dict[str, int]:
    """Uniform bits halfway between the lowest and highest candidate, as a BitOps budget's fields
    (validated with the config, where a bad candidate is named as such)."""
    middle = (max(bits) + min(bits)) // 2
    return {"target_wbits": middle, "target_abits": middle}


def _finite(loss: float, stage: str) -> float:
    if not math.isfinite(loss):
        raise UserError(f"the {stage} step's loss is {loss}")
    return loss


def check_model_stages(cfg: PipelineConfig, batch_size: int = 4, seed: int = 0) -> ModelCheck:
    """One step of every stage of `cfg`'s model on a random batch (`cfg.search.budgets[0]` is searched, a
    uniform budget at the middle candidate when there is none). Stops at the first stage that raises and
    reports it in `failed` and `error`."""
    check = ModelCheck(cfg.model.arch, cfg.model.input_size)
    state: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(seed)
    size = cfg.model.input_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=generator)

    def trace() -> None:
        costs = state["costs"] = cost_table(cfg.model.arch, size, cfg.search.cost_model, cfg.model.fixed_layers,
                                             cfg.model.num_classes, kwargs=cfg.model.kwargs)
        check.total_macs, check.quantized_share = costs.total_macs, costs.quantized_share
        check.searchable_layers, check.float_ops = len(costs.searchable), len(costs.float_ops)
        fp = state["model"] = initial_fp_model(cfg.model, cfg.fp, cfg.seed)
        state["fp_state"] = {key: value.clone() for key, value in fp.state_dict().items()}

    def joint_step() -> None:
        joint = state["model"] = joint_model(cfg.model, cfg.indicators.bits, state.pop("model"))
        joint.train()
        training = joint_training(joint, cfg.indicators, per_epoch=1, seed=cfg.seed, bf16=cfg.training.bf16)
        metrics = training.step(images, labels)
        check.joint_loss = _finite(metrics[f"loss_w{cfg.indicators.bits[-1]}"], "joint")

    def search() -> None:
        indicators = extract_indicators(state["model"], cfg.model.arch)
        budget = cfg.search.budgets[0] if cfg.search.budgets else Budget(**_middle_budget(cfg.indicators.bits))
        policy = Searcher(indicators, state["costs"], cfg.search.wbits, cfg.search.abits, cfg.search.alpha).solve(budget)
        check.policy_bitops_g = policy.totals.bitops_g
        state["policy"] = policy.assignment()

    def finetune_step() -> None:
        joint_state = state.pop("model").state_dict()  # the joint model's memory goes with it
        tuned = finetune_model(cfg.model, cfg.indicators.bits, state.pop("fp_state"), state["policy"], joint_state)
        del joint_state
        tuned.train()
        training = plain_training(tuned, cfg.finetune, 1, cfg.training.bf16)
        check.finetune_loss = _finite(training.step(images, labels)["loss"], "fine-tuning")

    steps: dict[str, Callable[[], None]] = {"trace": trace, "joint_step": joint_step, "search": search,
                                             "finetune_step": finetune_step}
    for stage in STAGES:
        started = time.perf_counter()
        try:
            steps[stage]()
        except Exception as error:  # reported as this stage's failure, a user's code's too
            if stage == "trace" and isinstance(error, UserError):  # a model the pipeline cannot take: bad input
                raise
            check.failed, check.error = stage, error_summary(error)
            return check
        finally:
            check.seconds[stage] = time.perf_counter() - started
        check.passed.append(stage)
    return check
