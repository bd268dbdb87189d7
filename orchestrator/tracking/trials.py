"""The sweep's trials as the pipeline plans and records them: one per budget and one per uniform
baseline, and how their models were evaluated. Plain data, read by the Tune trials
(`orchestrator.distributed.trial`) and by the summary of their MLflow runs (`orchestrator.tracking.summary`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config.schema import PipelineConfig, uniform_label

ONE_SHOT = "joint model, no fine-tuning"


@dataclass(frozen=True)
class TrialSpec:
    label: str
    kind: str  # "mpq" or "uniform"
    budget: dict[str, Any] | None = None  # Budget fields (mpq)
    bits: int | None = None  # uniform W{bits}A{bits}


def trial_specs(cfg: PipelineConfig) -> list[TrialSpec]:
    """One trial per budget and per uniform baseline (the schema keeps their labels distinct)."""
    specs = [TrialSpec(b.label(), "mpq", budget=b.model_dump(exclude_none=True)) for b in cfg.search.budgets]
    specs += [TrialSpec(uniform_label(b), "uniform", bits=b) for b in cfg.finetune.baselines]
    return specs  # not empty: preflight refuses a sweep without budgets and baselines


def evaluation_kind(cfg: PipelineConfig) -> str:
    return ONE_SHOT if cfg.finetune.epochs == 0 else "fine-tuned"
