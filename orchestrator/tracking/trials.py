"""The sweep's trials as the pipeline plans and records them: one per budget and one per uniform
baseline (times `finetune.seeds`), and how their models were evaluated. Plain data, read by the Tune trials
(`orchestrator.distributed.trial`) and by the summary of their MLflow runs (`orchestrator.tracking.summary`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from orchestrator.config.schema import PipelineConfig, uniform_label

ONE_SHOT = "joint model, no fine-tuning"


@dataclass(frozen=True)
class TrialSpec:
    label: str
    kind: str  # "mpq" (searched), "given" (a policy file) or "uniform"
    budget: dict[str, Any] | None = None  # Budget fields (mpq)
    bits: int | None = None  # uniform W{bits}A{bits}
    seed: int = 0  # fine-tuning runs at the config's seed plus this
    policy_label: str = ""  # the budget or baseline label the trial belongs to (its label without "-seed<k>")


def trial_specs(cfg: PipelineConfig) -> list[TrialSpec]:
    """One trial per budget and per uniform baseline (the schema keeps their labels distinct), and
    with `finetune.seeds` above 1 one per seed of each: <label>, <label>-seed1, ..."""
    specs = [TrialSpec(b.label(), "given" if b.policy else "mpq", budget=b.model_dump(exclude_none=True))
             for b in cfg.search.budgets]
    specs += [TrialSpec(uniform_label(b), "uniform", bits=b) for b in cfg.finetune.baselines]
    seeds = cfg.finetune.seeds if cfg.finetune.epochs > 0 else 1
    return [replace(spec, label=f"{spec.label}-seed{seed}" if seed else spec.label, seed=seed, policy_label=spec.label)
            for spec in specs for seed in range(seeds)]  # not empty: preflight refuses a sweep with nothing to run


def evaluation_kind(cfg: PipelineConfig) -> str:
    return ONE_SHOT if cfg.finetune.epochs == 0 else "fine-tuned"
