"""Everything about a pipeline config that can be known before training, checked in one pass.

`preflight(cfg)` runs at the start of every entry point (`limpq config validate`, `limpq run`,
`limpq indicators train`, the jobs/ scripts) before Ray starts or an MLflow run exists, so a mistake
costs seconds and one line naming the key and the fix, not a worker traceback after training. The
schema (orchestrator.config) already checked each value on its own; this pass checks what needs
several keys together, the model, the files or the machine.

The whole config is checked whatever the command, since the pipeline runs every stage of it.

Layer-neutral: torch, torchvision and the layer-1 readers only (no Ray, no MLflow).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import PipelineConfig, RecipeConfig
from orchestrator.errors import ConfigError, UserError
from orchestrator.model_import import error_summary, is_import_path

if TYPE_CHECKING:
    from orchestrator.search.costs import CostTable

# Ray Data reads and decodes in tasks of 1 CPU each, beside the CPUs Train workers hold for the run.
DATA_TASK_CPUS = 1


def preflight(cfg: PipelineConfig, *, cluster_resources: dict[str, float] | None = None) -> None:
    """Raise ConfigError/UserError (one line: key, problem, fix) for the first problem found.

    `cluster_resources`: the most CPU/GPU the cluster can ever offer, from
    `orchestrator.distributed.capacity.cluster_capacity()` after connecting to a cluster; None when
    unknown (no cluster yet, or an autoscaler without a fixed maximum), which skips that check.
    """
    _check_recipes(cfg)
    _check_bits(cfg)
    _check_gpu(cfg)
    if cluster_resources is not None:
        check_cluster_resources(cfg, cluster_resources)
    layer_names, searchable = _check_model(cfg)
    _check_latency(cfg, layer_names, searchable)
    _check_data(cfg)
    _check_storage(cfg)


def _check_storage(cfg: PipelineConfig) -> None:
    """Checkpoints and results can be written where `ray.storage_path` and `output_dir` say (on object
    storage: the bucket exists and takes the credentials)."""
    from orchestrator.data.storage import check_storage_uri

    check_storage_uri(cfg.ray.storage_path, "ray.storage_path")
    check_storage_uri(cfg.output_dir, "output_dir")


# ------------------------------------------------------------------------------ settings

def _training_stages(cfg: PipelineConfig) -> list[tuple[str, RecipeConfig]]:
    """The stages that run training steps: FP (source train, epochs > 0), indicators, fine-tuning
    (epochs > 0; 0 scores policies with the joint model instead)."""
    stages = [("fp", cfg.fp)] if cfg.fp.source == "train" and cfg.fp.epochs > 0 else []
    stages.append(("indicators", cfg.indicators))
    if cfg.finetune.epochs > 0:
        stages.append(("finetune", cfg.finetune))
    return stages


def _check_recipes(cfg: PipelineConfig) -> None:
    for stage, recipe in _training_stages(cfg):
        if recipe.nesterov and recipe.momentum == 0:
            raise ConfigError(f"{stage}.nesterov: Nesterov needs momentum; set {stage}.momentum > 0 "
                              f"or {stage}.nesterov: false")


def _bits_text(bits: list[int]) -> str:
    return ", ".join(map(str, bits))


def _check_bits(cfg: PipelineConfig) -> None:
    trained = cfg.indicators.bits
    for key, bits in (("search.wbits", cfg.search.wbits), ("search.abits", cfg.search.abits)):
        outside = [b for b in bits or [] if b not in trained]
        if outside:
            raise ConfigError(f"{key}: {_bits_text(outside)} not in indicators.bits ({_bits_text(trained)}); "
                              "the search has indicators only for those; add them to indicators.bits or drop them")
    # A baseline takes its step sizes and BN from the joint model (or is scored by it, with 0 epochs).
    if cfg.finetune.init_from_indicators or cfg.finetune.epochs == 0:
        outside = [b for b in cfg.finetune.baselines if b not in trained]
        if outside:
            raise ConfigError(f"finetune.baselines: {_bits_text(outside)} not in indicators.bits "
                              f"({_bits_text(trained)}); the joint model has no step sizes for them; add them to "
                              "indicators.bits or drop them")


def _check_gpu(cfg: PipelineConfig) -> None:
    if not cfg.ray.use_gpu:
        return
    if cfg.ray.gpus_per_worker == 0:
        raise ConfigError("ray.gpus_per_worker: 0 with ray.use_gpu: true; give each worker a GPU share "
                          "(e.g. 1) or set ray.use_gpu: false")
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("ray.use_gpu: true, but this machine has no CUDA device and no cluster is given "
                              "(ray.address or RAY_ADDRESS); set ray.use_gpu: false or run on a GPU cluster")


def check_cluster_resources(cfg: PipelineConfig, capacity: dict[str, float]) -> None:
    """Train workers hold `num_workers * cpus_per_worker` CPUs (and GPUs) for a whole stage, and Ray
    Data needs a CPU beside them or the input pipeline never starts: both must fit in `capacity`,
    the most the cluster can offer (see `cluster_capacity`)."""
    workers = cfg.ray.num_workers
    cpus = workers * cfg.ray.cpus_per_worker + DATA_TASK_CPUS
    offered_cpus = capacity.get("CPU", 0)
    if cpus > offered_cpus:
        raise ConfigError(f"ray.num_workers: {workers} workers x ray.cpus_per_worker {cfg.ray.cpus_per_worker:g} "
                          f"+ {DATA_TASK_CPUS} CPU for Ray Data need {cpus:g} CPUs, but the cluster offers at most "
                          f"{offered_cpus:g}; lower ray.num_workers or ray.cpus_per_worker")
    if cfg.ray.use_gpu:
        gpus = workers * cfg.ray.gpus_per_worker
        offered_gpus = capacity.get("GPU", 0)
        if gpus > offered_gpus:
            raise ConfigError(f"ray.use_gpu: {workers} workers x ray.gpus_per_worker {cfg.ray.gpus_per_worker:g} "
                              f"need {gpus:g} GPUs, but the cluster offers at most {offered_gpus:g}; lower "
                              "ray.num_workers or ray.gpus_per_worker, or set ray.use_gpu: false")


# ------------------------------------------------------------------------------ model and files

def _check_arch(arch: str) -> None:
    """A torchvision name (a user's `module:callable` is checked by building it, in _check_model)."""
    from torchvision import models

    if is_import_path(arch):
        return
    known = models.list_models(module=models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else (
            f"e.g. {', '.join(known[:5])}, ... ({len(known)} in all), or your own model as package.module:callable")
        raise ConfigError(f"model.arch: {arch!r} is not a torchvision classification model; {hint}")


def _check_fp_source(cfg: PipelineConfig) -> None:
    if cfg.fp.source == "torchvision":
        from torchvision import models

        if is_import_path(cfg.model.arch):
            raise ConfigError(f"fp.source: torchvision weights need a torchvision model.arch, not {cfg.model.arch}; "
                              "load your model's weights with fp.source: checkpoint")

        try:
            weights = models.get_weight(cfg.fp.weights)
        except (ValueError, AttributeError, KeyError):
            weights = None
        allowed = [str(w) for w in models.get_model_weights(cfg.model.arch)]
        if weights is None or str(weights) not in allowed:
            raise ConfigError(f"fp.weights: {cfg.fp.weights!r} are not weights of {cfg.model.arch}; "
                              f"choose one of {', '.join(allowed) or '(none published)'}")
    elif cfg.fp.source == "checkpoint":
        path = Path(cfg.fp.checkpoint)
        if not path.is_file():
            raise ConfigError(f"fp.checkpoint: file not found: {path}; give the path of a torch checkpoint")
        from orchestrator.modelinfo import build_configured_model
        from orchestrator.train.checkpoint import load_checkpoint, restore_model

        payload = load_checkpoint(path)  # weights_only: reads tensors, never runs code
        arch = payload["meta"].get("arch", cfg.model.arch)
        if arch != cfg.model.arch:
            raise ConfigError(f"fp.checkpoint: {path} holds a {arch}, but model.arch is {cfg.model.arch}")
        restore_model(build_configured_model(cfg.model), payload["model"], path)


def _check_model(cfg: PipelineConfig) -> tuple[set[str], list[str]]:
    """Architecture (a user's module imports, its callable returns an nn.Module), FP source, a forward
    pass at input_size, the share of MACs that runs quantized and the fixed layers; returns every
    Conv2d/Linear name and the searchable ones in forward order."""
    from orchestrator.search.costs import cost_table

    _check_arch(cfg.model.arch)
    _check_fp_source(cfg)
    try:  # traced once per model and size, then read from the cost cache (as the search does)
        costs = cost_table(cfg.model.arch, cfg.model.input_size, cfg.search.cost_model, None, cfg.model.num_classes,
                           kwargs=cfg.model.kwargs)
    except UserError:
        raise
    except Exception as error:  # the forward pass (a user's code too) fails at this size: one line
        raise ConfigError(f"model.input_size: {cfg.model.arch} does not run at {cfg.model.input_size}x"
                          f"{cfg.model.input_size} ({error_summary(error)}); choose a size it accepts") from None
    check_quantized_share(cfg, costs)
    names = [layer.name for layer in (*costs.searchable, *costs.fixed)]
    fixed = cfg.model.fixed_layers
    if fixed is None:
        return set(names), [layer.name for layer in costs.searchable]
    for name in fixed:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"layers are e.g. {', '.join(names[:4])}"
            raise ConfigError(f"model.fixed_layers: {name!r} is not a Conv2d/Linear of {cfg.model.arch}; {hint}")
    searchable = [name for name in names if name not in set(fixed)]
    if not searchable:
        raise ConfigError("model.fixed_layers: every layer is fixed, nothing is left to search; fix fewer layers")
    return set(names), searchable


def float_ops_text(costs: CostTable, count: int = 3) -> str:
    """The largest float operations with their shares of all MACs, e.g. `blocks.0.attn (attention) 1.2%`."""
    total = costs.total_macs or 1
    ops = sorted(costs.float_ops, key=lambda op: -op.macs)
    text = ", ".join(f"{op.name or '(model)'} ({op.kind}) {100 * op.macs / total:.1f}%" for op in ops[:count])
    return text + (f" and {len(ops) - count} more" if len(ops) > count else "")


def check_quantized_share(cfg: PipelineConfig, costs: CostTable) -> None:
    """Refuse a model whose quantized layers cover less than `model.min_quantized_share` of its MACs:
    its bit budgets would describe a small part of what it computes."""
    share = costs.quantized_share
    if share < cfg.model.min_quantized_share:
        raise ConfigError(f"model.min_quantized_share: only {100 * share:.1f}% of {cfg.model.arch}'s MACs at "
                          f"{cfg.model.input_size}x{cfg.model.input_size} run quantized, below "
                          f"{100 * cfg.model.min_quantized_share:g}%; in float: {float_ops_text(costs)}; make those "
                          "multiplies Conv2d/Linear module calls, or lower model.min_quantized_share")


def _check_latency(cfg: PipelineConfig, layer_names: set[str], searchable: list[str]) -> None:
    table_path = cfg.search.latency_table
    for index, budget in enumerate(cfg.search.budgets):
        if budget.latency_ms is not None and not table_path:
            raise ConfigError(f"search.budgets[{index}].latency_ms: a latency budget needs search.latency_table "
                              "(CSV or JSON rows: layer, wbits, abits, ms)")
    if not table_path:
        return
    if not Path(table_path).is_file():
        raise ConfigError(f"search.latency_table: file not found: {table_path}")
    from orchestrator.search.latency import load_latency_table

    table = load_latency_table(table_path)
    unknown = sorted({layer for layer, _, _ in table if layer not in layer_names})
    if unknown:
        raise ConfigError(f"search.latency_table: {table_path} names layers {cfg.model.arch} does not have: "
                          f"{', '.join(unknown[:3])}" + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""))
    wbits = cfg.search.wbits or cfg.indicators.bits
    abits = cfg.search.abits or cfg.indicators.bits
    missing = [(name, w, a) for name in searchable for w in wbits for a in abits if (name, w, a) not in table]
    if missing:
        examples = ", ".join(f"{name} W{w}A{a}" for name, w, a in missing[:3])
        raise ConfigError(f"search.latency_table: {table_path} lacks {len(missing)} (layer, wbits, abits) entries "
                          f"the search needs, e.g. {examples}")


# ------------------------------------------------------------------------------ data

def dataset_train_samples(cfg: PipelineConfig) -> Callable[[float], int] | None:
    """Check the dataset (local or object storage: the data layer's `check_dataset`) and return how
    many training samples a `train_fraction` selects; None while the digits demo is still to be
    built on first use."""
    from orchestrator.data.layout import KEY, check_dataset, count_samples
    from orchestrator.data.storage import locate

    check_dataset(cfg)
    if cfg.data.demo and not locate(cfg.data.path, KEY).exists(KEY):
        return None
    return lambda fraction: count_samples(cfg, "train", fraction)


def _check_data(cfg: PipelineConfig) -> None:
    train_samples = dataset_train_samples(cfg)
    if train_samples is None:
        return
    workers, batch = cfg.ray.num_workers, cfg.data.batch_size
    for stage, recipe in _training_stages(cfg):
        samples = train_samples(recipe.train_fraction)
        share = samples // workers
        if share < batch:
            raise ConfigError(
                f"data.batch_size: {batch} is more than a worker's share of the {stage} training set ({samples} "
                f"images at {stage}.train_fraction {recipe.train_fraction:g} / {workers} worker(s) = {share}), so "
                f"an epoch would have no step; lower data.batch_size to {max(share, 1)} or less, or raise "
                f"{stage}.train_fraction")
