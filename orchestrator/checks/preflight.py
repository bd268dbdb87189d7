"""Everything about a pipeline config that can be known before training, checked in one pass.

`preflight(cfg)` runs at the start of every entry point (`limpq config validate`, `limpq run`,
`limpq indicators train`, the jobs/ scripts) before Ray starts or an MLflow run exists, so a mistake
costs seconds and one line naming the key and the fix, not a worker traceback after training. The
schema (orchestrator.config.schema) already checked each value on its own; this pass checks what needs
several keys together, the model, the files or the machine.

The whole config is checked whatever the command, since the pipeline runs every stage of it.
What the checks computed (the dataset's listing, the model's cost table) comes back in a
`CheckedConfig`, so the command reuses it instead of listing or tracing again.

Layer-neutral: torch, torchvision and the layer-1 readers only (no Ray, no MLflow).
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass

import grpc
import torch
from torchvision import models

from orchestrator.config.schema import ModelConfig, PipelineConfig, RecipeConfig
from orchestrator.data.layout import (
    DatasetIndex,
    check_dataset,
    demo_to_build,
    index_dataset,
)
from orchestrator.data.storage import check_storage_uri
from orchestrator.common.errors import ConfigError, InfeasibleError, UserError
from orchestrator.common.fileio import readable_file
from orchestrator.checks.tracking_store import SERVICE_TIMEOUT_S, check_tracking_store
from orchestrator.search.indicators import Indicators
from orchestrator.models.user_module import error_summary, is_import_path
from orchestrator.models.info import build_configured_model
from orchestrator.search.costs import CostTable, cost_table, float_ops_text
from orchestrator.search.ilp import Searcher
from orchestrator.search.latency import load_latency_table
from orchestrator.search.policy import given_policy
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.compiled import compiler_missing

# Ray Data reads and decodes in tasks of 1 CPU each, beside the CPUs Train workers hold for the run.
DATA_TASK_CPUS = 1


@dataclass(frozen=True)
class CheckedConfig:
    """A config that passed preflight, with what the checks computed."""

    config: PipelineConfig
    costs: CostTable  # the search's cost table of the configured model, input size and fixed layers
    dataset: DatasetIndex | None  # None: the digits demo is built when the run starts


def preflight(cfg: PipelineConfig, *, sweep: bool = True,
              cluster_resources: dict[str, float] | None = None) -> CheckedConfig:
    """Raise ConfigError/UserError (one line: key, problem, fix) for the first problem found.

    `sweep`: the command runs the budget sweep (`limpq run`, and `limpq config validate`, which checks
    what `limpq run` would), so it needs budgets that some policy can meet.
    `cluster_resources`: the most CPU/GPU the cluster can ever offer, from
    `orchestrator.distributed.capacity.cluster_capacity()` after connecting to a cluster; None when
    unknown (no cluster yet, or an autoscaler without a fixed maximum), which skips that check.
    """
    _check_recipes(cfg)
    _check_bits(cfg)
    _check_resources(cfg)
    _check_compile(cfg)
    if cluster_resources is not None:
        check_cluster_resources(cfg, cluster_resources)
    _check_services(cfg)
    costs = _check_model(cfg)
    _check_latency(cfg, costs)
    if sweep:
        _check_budgets(cfg, costs)
    dataset = _check_data(cfg)
    _check_storage(cfg)
    return CheckedConfig(cfg, costs, dataset)


def _check_storage(cfg: PipelineConfig) -> None:
    """Checkpoints and results can be written where `ray.storage_path` and `output_dir` say (on object
    storage: the bucket exists and takes the credentials)."""
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


def _check_resources(cfg: PipelineConfig) -> None:
    """What the workers ask for exists: CPUs on this machine for the local Ray, CUDA for GPU workers."""
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # the embedded local Ray: its Train workers run on this machine's cores
        cores = os.cpu_count() or 1
        wanted = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        if wanted > cores:
            raise ConfigError(f"ray.cpus_per_worker: {cfg.ray.num_workers} worker(s) x {cfg.ray.cpus_per_worker:g} CPUs "
                              f"need {wanted:g} CPUs, but the local Ray runs on this machine's {cores}; lower "
                              "ray.cpus_per_worker or ray.num_workers, or give a cluster (ray.address)")
    if not cfg.ray.use_gpu:
        return
    if cfg.ray.gpus_per_worker == 0:
        raise ConfigError("ray.gpus_per_worker: 0 with ray.use_gpu: true; give each worker a GPU share "
                          "(e.g. 1) or set ray.use_gpu: false")
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        if not torch.cuda.is_available():
            raise ConfigError("ray.use_gpu: true, but this machine has no CUDA device and no cluster is given "
                              "(ray.address or RAY_ADDRESS); set ray.use_gpu: false or run on a GPU cluster")


# ------------------------------------------------------------------------------ services

def _check_services(cfg: PipelineConfig) -> None:
    """The MLflow tracking server and the Ray cluster the run will use answer, within seconds: a
    server that is down would otherwise be retried for minutes after work has started."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    check_tracking_store(uri, "mlflow.tracking_uri" if cfg.mlflow.tracking_uri else "MLFLOW_TRACKING_URI")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or ""
    key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if address and address not in ("auto", "local"):
        target = address.removeprefix("ray://")
        host, _, port = target.rpartition(":")
        if "://" in target or not host or not port.isdigit():
            raise ConfigError(f"{key}: {address!r} is not a Ray cluster address; give HOST:PORT of its GCS (e.g. "
                              "127.0.0.1:6379), ray://HOST:PORT for Ray Client, or auto")
        try:
            socket.create_connection((host, int(port)), timeout=SERVICE_TIMEOUT_S).close()
        except OSError as error:
            raise ConfigError(f"{key}: no Ray cluster answers at {address} ({error.strerror or error}); start it "
                              "(ray start --head, cluster/local-up.sh) or fix the address") from None
        not_ray = _not_ray(target, ray_client=address.startswith("ray://"))
        if not_ray:
            raise ConfigError(f"{key}: {address} answers, but not as a Ray cluster ({not_ray}); give the address "
                              "of its GCS (`ray start --head` prints it; port 6379 by default) or of Ray Client "
                              "(ray://HOST:10001)")


# Ray's GCS answers this request (an empty message) on every cluster; another gRPC server answers
# UNIMPLEMENTED, and a server that does not speak gRPC never completes the call.
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"
# Answers that still come from a GCS: one that asks for Ray's auth token.
_GCS_REFUSALS = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _not_ray(target: str, ray_client: bool) -> str | None:
    """Why the gRPC server at `target` (HOST:PORT) is not Ray's GCS, or not a Ray Client server when
    `ray_client` (which speaks gRPC too, another service); None when it is."""
    with grpc.insecure_channel(target) as channel:
        if ray_client:
            try:
                grpc.channel_ready_future(channel).result(timeout=SERVICE_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                return f"no gRPC answer within {SERVICE_TIMEOUT_S} s"
            return None
        try:
            channel.unary_unary(GCS_PROBE)(b"", timeout=SERVICE_TIMEOUT_S)
        except grpc.RpcError as error:
            code = error.code()
            if code in _GCS_REFUSALS:
                return None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return "a gRPC server without Ray's GCS service"
            return f"no gRPC answer within {SERVICE_TIMEOUT_S} s" if code == grpc.StatusCode.DEADLINE_EXCEEDED \
                else f"it does not speak gRPC: {code.name}"
    return None


def _check_compile(cfg: PipelineConfig) -> None:
    """`training.compile: on` needs inductor's code generator for the workers' device; checked here when
    the workers run on this machine (a cluster's nodes are checked by the workers themselves)."""
    if cfg.training.compile != "on" or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    missing = compiler_missing("cuda" if cfg.ray.use_gpu else "cpu")
    if missing:
        raise ConfigError(f"training.compile: on, but {missing}; install it or set training.compile: auto or off")


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
        try:
            path = readable_file(cfg.fp.checkpoint, "torch checkpoint")
            payload = load_checkpoint(path)  # weights_only: reads tensors, never runs code
        except UserError as error:
            raise ConfigError(f"fp.checkpoint: {error}") from None
        arch = payload["meta"].get("arch", cfg.model.arch)
        if arch != cfg.model.arch:
            raise ConfigError(f"fp.checkpoint: {path} holds a {arch}, but model.arch is {cfg.model.arch}")
        restore_model(build_configured_model(cfg.model), payload["model"], path)


def _check_model(cfg: PipelineConfig) -> CostTable:
    """Architecture (a user's module imports, its callable returns an nn.Module), FP source, a forward
    pass at input_size, the share of MACs that runs quantized and the fixed layers; returns the cost
    table of the configured model."""
    _check_arch(cfg.model.arch)
    _check_fp_source(cfg)
    try:  # traced once per model and size, then read from the cost cache (as the search does)
        default = cost_table(cfg.model.arch, cfg.model.input_size, cfg.search.cost_model, None, cfg.model.num_classes,
                             kwargs=cfg.model.kwargs)
    except UserError:
        raise
    except Exception as error:  # the forward pass (a user's code too) fails at this size: one line
        raise ConfigError(f"model.input_size: {cfg.model.arch} does not run at {cfg.model.input_size}x"
                          f"{cfg.model.input_size} ({error_summary(error)}); choose a size it accepts") from None
    _check_quantized_share(cfg.model, default)
    fixed = cfg.model.fixed_layers
    if fixed is None:
        if not default.searchable:  # a small user model: its only layers are docs/method.md §2.3's fixed ones
            raise ConfigError(f"model.fixed_layers: {cfg.model.arch}'s only Conv2d/Linear layers are the first "
                              f"convolution and the classifier ({', '.join(la.name for la in default.fixed)}), "
                              "fixed by default, so nothing is left to search; give model.fixed_layers (e.g. []) "
                              "to search them")
        return default
    names = [layer.name for layer in (*default.searchable, *default.fixed)]
    for name in fixed:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"layers are e.g. {', '.join(names[:4])}"
            raise ConfigError(f"model.fixed_layers: {name!r} is not a Conv2d/Linear of {cfg.model.arch}; {hint}")
    if all(name in set(fixed) for name in names):
        raise ConfigError("model.fixed_layers: every layer is fixed, nothing is left to search; fix fewer layers")
    return cost_table(cfg.model.arch, cfg.model.input_size, cfg.search.cost_model, fixed, cfg.model.num_classes,
                      kwargs=cfg.model.kwargs)


def _check_quantized_share(model: ModelConfig, costs: CostTable) -> None:
    """Refuse a model whose quantized layers cover less than `model.min_quantized_share` of its MACs:
    its bit budgets would describe a small part of what it computes."""
    share = costs.quantized_share
    if share < model.min_quantized_share:
        raise ConfigError(f"model.min_quantized_share: only {100 * share:.1f}% of {model.arch}'s MACs at "
                          f"{model.input_size}x{model.input_size} run quantized, below "
                          f"{100 * model.min_quantized_share:g}%; in float: {float_ops_text(costs)}; make those "
                          "multiplies Conv2d/Linear module calls, or lower model.min_quantized_share")


def _check_latency(cfg: PipelineConfig, costs: CostTable) -> None:
    table_path = cfg.search.latency_table
    for index, budget in enumerate(cfg.search.budgets):
        if budget.latency_ms is not None and not table_path:
            raise ConfigError(f"search.budgets[{index}].latency_ms: a latency budget needs search.latency_table "
                              "(CSV or JSON rows: layer, wbits, abits, ms)")
    if not table_path:
        return
    try:
        table = load_latency_table(table_path)
    except UserError as error:
        raise ConfigError(f"search.latency_table: {error}") from None
    layer_names = {layer.name for layer in (*costs.searchable, *costs.fixed)}
    unknown = sorted({layer for layer, _, _ in table if layer not in layer_names})
    if unknown:
        raise ConfigError(f"search.latency_table: {table_path} names layers {cfg.model.arch} does not have: "
                          f"{', '.join(unknown[:3])}" + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""))
    wbits = cfg.search.wbits or cfg.indicators.bits
    abits = cfg.search.abits or cfg.indicators.bits
    missing = [(name, w, a) for name in costs.names for w in wbits for a in abits if (name, w, a) not in table]
    if missing:
        examples = ", ".join(f"{name} W{w}A{a}" for name, w, a in missing[:3])
        raise ConfigError(f"search.latency_table: {table_path} lacks {len(missing)} (layer, wbits, abits) entries "
                          f"the search needs, e.g. {examples}")


def _check_budgets(cfg: PipelineConfig, costs: CostTable) -> None:
    """Every budget can be met by some policy over the candidate bit-widths: the search's own ILP,
    solved with indicators that exclude no entry, on the model's cost table. Trained indicators can
    only exclude entries, so a budget refused here can never be met; one accepted here fails after
    training only if the indicators exclude every policy that meets it."""
    if not cfg.search.budgets and not cfg.finetune.baselines:
        raise ConfigError("search.budgets: empty, and so is finetune.baselines: the sweep has nothing to run; add a "
                          "budget, e.g. {target_wbits: 4, target_abits: 4} (`limpq indicators train` trains "
                          "indicators alone)")
    bits = cfg.indicators.bits
    steps = {name: {b: 2.0 ** -b for b in bits} for name in costs.names}  # any indicators that grow as b falls
    searcher = Searcher(Indicators(cfg.model.arch, bits, costs.names, steps, steps), costs, cfg.search.wbits,
                        cfg.search.abits, cfg.search.alpha, cfg.search.latency_table)
    for index, budget in enumerate(cfg.search.budgets):
        if budget.policy is not None:
            try:
                given_policy(budget.policy, costs, bits)
            except UserError as error:
                raise ConfigError(f"search.budgets[{index}].policy: {error}") from None
            continue
        try:
            searcher.solve(budget)
        except InfeasibleError as error:
            raise ConfigError(f"search.budgets[{index}] ({budget.label()}): {error}; no policy can meet it, so "
                              "loosen it or add lower bit-widths to indicators.bits") from None


# ------------------------------------------------------------------------------ data

def _check_data(cfg: PipelineConfig) -> DatasetIndex | None:
    """The dataset, listed once (the returned index serves the rest of the command), checked, and
    every training stage's share per worker at least one batch; None while the digits demo is
    still to be built on first use."""
    if demo_to_build(cfg.data):
        return None
    index = index_dataset(cfg.data)
    check_dataset(index, cfg.model.num_classes)
    _check_class_count(cfg, index)
    workers, batch = cfg.ray.num_workers, cfg.data.batch_size
    for stage, recipe in _training_stages(cfg):
        samples = index.count("train", recipe.train_fraction, cfg.seed)
        share = samples // workers
        if share == 0:
            raise ConfigError(
                f"ray.num_workers: {workers} workers share the {samples} images of the {stage} training set "
                f"({stage}.train_fraction {recipe.train_fraction:g}), so some get none; lower ray.num_workers to "
                f"{max(samples, 1)} or less, or raise {stage}.train_fraction")
        if share < batch:
            raise ConfigError(
                f"data.batch_size: {batch} is more than a worker's share of the {stage} training set ({samples} "
                f"images at {stage}.train_fraction {recipe.train_fraction:g} / {workers} worker(s) = {share}), so "
                f"an epoch would have no step; lower data.batch_size to {max(share, 1)} or less, or raise "
                f"{stage}.train_fraction")
    return index


def _check_class_count(cfg: PipelineConfig, index: DatasetIndex) -> None:
    """The classifier has one output per class of the dataset: more would train logits no label ever
    asks for (and report accuracy over classes that are not there); one class is no classification."""
    train = index.splits["train"]
    classes = len(index.classes) if index.classes is not None else max(train.labels) + 1
    if classes < 2:
        raise ConfigError(f"data.path: {train.location} holds one class, and a classifier needs at least two; add "
                          "the images of the other classes")
    if classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but {train.location} holds {classes} classes; "
                          f"set model.num_classes: {classes}")
