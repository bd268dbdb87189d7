"""The one pipeline config schema: every stage (data, FP, indicators, search, fine-tuning, training
numerics, Ray, MLflow) reads its settings from a `PipelineConfig` (loaded from YAML by `orchestrator.config.loading`).

Layer-neutral: pydantic only, so every layer may import it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Budgets one config or one `limpq search` sweep may hold: a search sweep of this many takes about a minute,
# a pipeline runs a fine-tuning trial for each.
MAX_BUDGETS = 10_000

MIN_BITS, MAX_BITS = 2, 8
# MLflow's characters for metric, param and tag keys (mlflow.utils.validation) less "/": a budget label
# is a metric key (top1_<label>), a file name (policies/<label>.png) and part of Ray Train run names.
STORABLE_NAME = re.compile(r"[\w.\- :]+")
MAX_NAME_LENGTH = 200  # MLflow keys hold 250 characters; the label gets a prefix such as "top1_"


def storable_name_problem(name: str) -> str | None:
    """Why MLflow, Ray or a file system would refuse `name` as a key or file name, or None."""
    if not STORABLE_NAME.fullmatch(name):
        return "may only hold letters, digits, '_', '-', '.', ':' and spaces"
    if name.startswith(".") or posixpath.normpath(name) != name:
        return "must not start with '.'"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    return None


def budget_alias(label: str) -> str:
    """The registered-model alias of a budget label (aliases allow letters, digits, '-' and '_')."""
    return "budget-" + re.sub(r"[^a-z0-9_-]+", "-", label.lower()).strip("-")


def uniform_label(bits: int) -> str:
    """The sweep label of the uniform W{bits}A{bits} baseline."""
    return f"uniform-W{bits}A{bits}"


def _check_bits(values: list[int] | None) -> list[int] | None:
    if values is None:
        return None
    if not values:
        raise ValueError("empty candidate bit-width list")
    for b in values:
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"bit-width {b} outside {MIN_BITS}..{MAX_BITS}")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate bit-widths in {values}")
    return values


# Keys that moved to another section, refused with their new name (a plain "unknown key" would leave the
# user to guess where they went).
MOVED_KEYS = {"ray.bf16": "training.bf16", "ray.compile": "training.compile"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = Field("resnet18", description="A torchvision classification model name, or your own model as "
                      "`package.module:callable` (imported with the working directory on sys.path).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model builder "
                                   "or callable, besides num_classes (e.g. {image_size: 64} for a ViT).")
    num_classes: int = Field(1000, ge=2)
    input_size: int = Field(224, ge=8, description="Square input resolution for training crops and cost accounting.")
    fixed_layers: list[str] | None = Field(
        None, description="Names of layers kept out of the search; default: first conv and the classifier."
    )
    min_quantized_share: float = Field(
        0.9, ge=0, le=1, description="Least share of the model's MACs that must run quantized (searchable and "
        "fixed layers); below it the config is refused, below 0.95 `limpq config validate` warns and names "
        "the float operations.")


class DataConfig(_Section):
    format: Literal["folder", "parquet"] = "folder"
    path: str = Field("demo_data", description="Root holding train/ and val/ (folders or Parquet shards).")
    demo: bool = Field(False, description="Build the scikit-learn digits demo set at `path` when it is missing.")
    resize_size: int | None = Field(None, ge=8, description="Eval resize before the center crop; default input_size * 8/7.")
    batch_size: int = Field(64, ge=1, description="Per-worker batch size.")
    min_crop_scale: float = Field(0.08, gt=0, le=1, description="RandomResizedCrop lower scale bound.")
    hflip: bool = Field(True, description="Random horizontal flips (off for digits).")


class RecipeConfig(_Section):
    """A training recipe shared by the FP, indicator and fine-tuning stages."""

    epochs: int = Field(1, ge=0)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(2.5e-5, ge=0)
    nesterov: bool = False
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    scheduler_interval: Literal["step", "epoch"] = Field("step", description="Update the lr every step or once per epoch.")
    min_lr: float = Field(0.0, ge=0, description="Where the cosine schedule ends.")
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="Clip gradients by value.")
    train_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the training set used per epoch.")


class FPConfig(RecipeConfig):
    source: Literal["train", "torchvision", "checkpoint"] = "train"
    weights: str | None = Field(None, description="torchvision weights name, e.g. ResNet18_Weights.IMAGENET1K_V1.")
    checkpoint: str | None = None
    epochs: int = Field(3, ge=0, description="0 with source 'train': the random initialisation is the FP model "
                        "(smoke tests).")
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _source_has_input(self) -> FPConfig:
        if self.source == "torchvision" and not self.weights:
            raise ValueError("source 'torchvision' needs fp.weights")
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("source 'checkpoint' needs fp.checkpoint")
        return self


class IndicatorConfig(RecipeConfig):
    bits: list[int] = Field(default_factory=lambda: [6, 5, 4, 3, 2])
    epochs: int = Field(3, ge=1, description="The search needs trained indicators: at least 1.")
    lr: float = Field(0.01, gt=0)
    nesterov: bool = True  # the reference recipe (docs/method.md §3)
    scheduler_interval: Literal["step", "epoch"] = Field("epoch", description="Update the lr every step or once per epoch.")
    min_lr: float = Field(1e-5, ge=0, description="Where the cosine schedule ends.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip gradients by value.")
    train_fraction: float = Field(0.5, gt=0, le=1, description="Fraction of the training set used per epoch.")

    _bits = field_validator("bits")(_check_bits)


class Budget(_Section):
    """One point of a sweep: any combination of constraints, at least one."""

    name: str | None = None
    target_wbits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS)
    target_abits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS)
    bitops_g: float | None = Field(None, gt=0, allow_inf_nan=False)
    compression_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)
    size_mb: float | None = Field(None, gt=0, allow_inf_nan=False)
    latency_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    avg_wbits: float | None = Field(None, gt=0, allow_inf_nan=False)
    avg_abits: float | None = Field(None, gt=0, allow_inf_nan=False)
    policy: str | None = Field(None, description="A policy file (policy JSON v1, as `limpq search --output` writes "
                               "it) to fine-tune as given instead of searching one: a hand-made policy, or a control "
                               "such as a random policy of equal cost. It takes no constraints.")

    @model_validator(mode="after")
    def _one_constraint(self) -> Budget:
        if (self.target_wbits is None) != (self.target_abits is None):
            raise ValueError("target_wbits and target_abits go together")
        fields = ("target_wbits", "bitops_g", "compression_ratio", "size_mb", "latency_ms", "avg_wbits", "avg_abits")
        given = [f for f in fields if getattr(self, f) is not None]
        if self.policy is not None and given:
            raise ValueError(f"policy is fine-tuned as given, so {', '.join(given)} would do nothing; drop "
                             f"{'it' if len(given) == 1 else 'them'} or the policy")
        if self.policy is None and not given:
            raise ValueError("a budget needs at least one constraint")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        if self.policy is not None:
            return "policy-" + Path(self.policy).stem
        parts = []
        if self.target_wbits is not None:
            parts.append(f"W{self.target_wbits}A{self.target_abits}")
        for key, short in (("bitops_g", "G"), ("compression_ratio", "CR"), ("size_mb", "MB"), ("latency_ms", "ms"),
                           ("avg_wbits", "avgW"), ("avg_abits", "avgA")):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{short}{value:g}")
        return "-".join(parts)


class SearchConfig(_Section):
    alpha: float = Field(2.0, ge=0)
    cost_model: Literal["exact", "limpq-official"] = "exact"
    wbits: list[int] | None = Field(None, description="Weight candidates; default: indicators.bits.")
    abits: list[int] | None = Field(None, description="Activation candidates; default: indicators.bits.")
    latency_table: str | None = Field(None, description="CSV or JSON rows: layer, wbits, abits, ms.")
    budgets: list[Budget] = Field(default_factory=list)
    scores: Literal["limpq", "hessian"] = Field(
        "limpq", description="What the ILP weighs: limpq, the learned step sizes of joint indicator training; "
        "hessian, HAWQ-style Hessian-trace sensitivities of the FP weights and layer inputs at each candidate bit "
        "(docs/method.md), computed at the start of the sweep. Same ILP, budgets and alpha (1 weighs the hessian "
        "weight and activation terms equally).")
    hessian_batches: int = Field(4, ge=1, description="With scores hessian: training batches the traces average over.")
    hessian_samples: int = Field(4, ge=1, description="With scores hessian: Hutchinson (Rademacher) vectors per batch; "
                                 "each costs about 2 x (searchable layers) backward passes.")

    _bits = field_validator("wbits", "abits")(_check_bits)

    @field_validator("budgets", mode="before")
    @classmethod
    def _at_most_max_budgets(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_BUDGETS:
            raise ValueError(f"{len(value):,} budgets, above the limit of {MAX_BUDGETS:,} per config (the sweep runs "
                             "a trial for each); split them over several configs")
        return value


class FinetuneConfig(RecipeConfig):
    epochs: int = Field(2, ge=0)
    lr: float = Field(0.01, gt=0)
    init_from_indicators: bool = Field(
        True, description="Start step sizes and BN from the joint-trained values at the chosen bits."
    )
    baselines: list[int] = Field(default_factory=list, description="Uniform WbAb baselines to fine-tune too.")
    seeds: int = Field(1, ge=1, le=100, description="Fine-tune every policy this many times, with seeds seed, seed + 1, "
                       "...: trials <label>, <label>-seed1, ...; the summary gives each policy's mean and spread. "
                       "With epochs 0 (one-shot scores) a policy is scored once.")
    bn_recalibration_batches: int = Field(
        8, ge=0, description="Where a policy is scored with the joint model instead of fine-tuned (epochs 0, "
        "`limpq evaluate`): first recompute BN statistics on this many training batches; 0 keeps the statistics "
        "joint training left, which mismatch mixed policies (README Results).")

    _bits = field_validator("baselines")(lambda v: _check_bits(v) if v else v)


class TrainingConfig(_Section):
    """How every training stage (FP, indicators, fine-tuning) computes its steps; `ray` says where they run."""

    bf16: bool = Field(False, description="bf16 autocast on CUDA. Part of the stage keys: it changes the numbers.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training steps (inductor). auto: on CUDA; eager on CPU, where "
        "compiling costs more time than it saves. on: wherever inductor has a code generator. off: eager. The "
        "same numbers to float tolerance, so not part of the stage keys.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Cluster address; default: join RAY_ADDRESS or start local Ray.")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    storage_path: str = Field("runs/ray", description="Checkpoints and results: a local dir, shared path or s3:// URI.")
    max_failures: int = Field(2, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    experiment: str = "limpq"


class PipelineConfig(_Section):
    name: str = Field("limpq", description="Run name; submitting the same name again resumes. Letters, digits, "
                      "'_', '-', '.', ':' and spaces.")
    seed: int = 0
    output_dir: str = Field("runs", description="Local outputs (checkpoints, indicators, policies).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    fp: FPConfig = Field(default_factory=FPConfig)
    indicators: IndicatorConfig = Field(default_factory=IndicatorConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("name")
    @classmethod
    def _storable_name(cls, name: str) -> str:
        problem = storable_name_problem(name)
        if problem:
            raise ValueError(f"{name!r} {problem}: it names MLflow runs and directories")
        return name

    @model_validator(mode="after")
    def _storable_distinct_labels(self) -> PipelineConfig:
        """Every budget and baseline label is a run name, a metric key and a registry alias: storable,
        and distinct as aliases (which ignore case and map other characters to '-'), or one trial
        would take another's alias."""
        labels: dict[str, tuple[str, str]] = {}  # alias -> (label, where)
        for index, budget in enumerate(self.search.budgets):
            key, label = f"search.budgets[{index}]", budget.label()
            problem = storable_name_problem(label)
            if problem:
                which = "name" if budget.name else "generated label"
                raise ValueError(f"{key}.name: {which} {label!r} {problem} (MLflow refuses it); give another `name`")
            alias = budget_alias(label)
            if alias in labels:
                first, where = labels[alias]
                same = "repeats" if first == label else f"and {first!r} of"
                raise ValueError(f"{key}: label {label!r} {same} {where}" + ("" if first == label else
                                 f" are one registry alias ({alias})") + "; give one of them a distinct `name`")
            labels[alias] = (label, key)
        for bits in self.finetune.baselines:
            if budget_alias(uniform_label(bits)) in labels:
                _, where = labels[budget_alias(uniform_label(bits))]
                raise ValueError(f"{where}.name: {uniform_label(bits)!r} is the label of the finetune.baselines "
                                 f"entry {bits}; rename the budget")
        return self

    def with_absolute_paths(self) -> PipelineConfig:
        """A copy whose local paths are absolute, so Ray workers and Tune trials (which run in other
        working directories) find the same files; URIs such as s3:// are left alone."""
        def absolute(path: str | None) -> str | None:
            return path if path is None or "://" in path else str(Path(path).expanduser().resolve())

        copy = self.model_copy(deep=True)
        copy.output_dir = absolute(self.output_dir)
        copy.data.path = absolute(self.data.path)
        copy.ray.storage_path = absolute(self.ray.storage_path)
        copy.search.latency_table = absolute(self.search.latency_table)
        for budget in copy.search.budgets:
            budget.policy = absolute(budget.policy)
        if self.fp.checkpoint:
            copy.fp.checkpoint = absolute(self.fp.checkpoint)
        return copy

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key` view, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out
