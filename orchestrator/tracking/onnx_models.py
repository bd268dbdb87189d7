"""The ONNX side of the model registry: every finished sweep trial's model exported as ONNX QDQ
(`orchestrator.quant.onnx_export`), checked in ONNX Runtime against the PyTorch model on the val
split, logged with `mlflow.onnx.log_model` and registered as a version of `<name>-<arch>-onnx` with the
PyTorch version's tags and aliases; and `limpq export` of a registered or logged PyTorch model.

Layer 2 (MLflow). The trial hook runs in the trial's process, after the PyTorch model is logged.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
import mlflow.onnx
import mlflow.pytorch
import onnx
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info, infer_signature
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import DatasetIndex
from orchestrator.data.local import split_dataset
from orchestrator.data.transforms import transforms_for
from orchestrator.checks.tracking_store import check_tracking_store
from orchestrator.common.errors import UserError, first_line
from orchestrator.common.fileio import replaced_on_success
from orchestrator.quant.onnx_check import (
    MIN_AGREEMENT,
    OnnxAgreement,
    compare_with_torch,
    cpu_session,
    runtime_kernels,
    RuntimeKernels,
)
from orchestrator.quant.deployed import Deployment, deploy
from orchestrator.quant.lsq import LsqQuantizer
from orchestrator.quant.onnx_export import (
    INPUT_NAME,
    OnnxExport,
    export_onnx,
    float_copy,
)
from orchestrator.common.redact import redact
from orchestrator.tracking.models import ModelRecord, register_model
from orchestrator.tracking.runs import DEFAULT_TRACKING_URI, SQLITE_PREFIX, Tracker

log = logging.getLogger("limpq")

ONNX_MODEL_NAME = "onnx-model"  # the LoggedModel's name in a trial run, beside the PyTorch "model"
ONNX_COLUMNS = ("onnx_top1", "onnx_agreement", "onnx_max_logit_diff")
TAG_ONNX_CHECK = "limpq.onnx_check"
TAG_ONNX_KERNELS = "limpq.onnx_kernels"
TAG_LIMIT = 5000  # within MLflow's limit on a tag value: a very long list of float layers is cut
MEGABYTE = 2**20  # the unit of the policies' size_mb


def onnx_registered_name(pytorch_name: str) -> str:
    """The registered model holding the ONNX exports of registered PyTorch model `pytorch_name`."""
    return f"{pytorch_name}-onnx"


def val_batches(cfg: PipelineConfig, dataset: DatasetIndex) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The config's val split in batches of `data.batch_size`, read in this process (as `limpq
    evaluate` reads it)."""
    _, eval_transform = transforms_for(cfg.data, cfg.model.input_size)
    yield from DataLoader(split_dataset(dataset, "val", eval_transform, cfg.seed), batch_size=cfg.data.batch_size)


def log_onnx_model(tracker: Tracker, run_id: str, path: Path, example: torch.Tensor, step: int,
                   tags: Mapping[str, Any]) -> str:
    """`mlflow.onnx.log_model` of the file at `path` into `run_id`, with a signature and input
    example, run by ONNX Runtime on the CPU; returns the model URI."""
    mlflow.set_tracking_uri(tracker.tracking_uri)
    # the LoggedModel goes to the fluent active experiment: the run's (see tracking.models.log_model)
    mlflow.set_experiment(experiment_id=tracker.experiment_id)
    [logits] = cpu_session(path).run(None, {INPUT_NAME: example.numpy()})
    info = mlflow.onnx.log_model(
        onnx.load_model(path), name=ONNX_MODEL_NAME, run_id=run_id,
        signature=infer_signature(example.numpy(), logits), input_example=example.numpy(), step=step,
        tags=dict(tags), save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])
    return info.model_uri


def deploy_trial_model(tracker: Tracker, run_id: str, model: torch.nn.Module, example: torch.Tensor,
                       directory: Path) -> Deployment | None:
    """A finished trial's model as deployed (`quant.deployed.deploy`), its fast file in `directory`; None
    for a model ONNX QDQ cannot express, with the run's `limpq.onnx_check` tag saying why (the trial's
    PyTorch results stand, and its model is registered as trained)."""
    try:
        return deploy(model, example, directory / "model.onnx")
    except UserError as error:
        _not_exported(tracker, run_id, error)
        return None


def _not_exported(tracker: Tracker, run_id: str, error: UserError) -> None:
    tracker.set_tags(run_id, {TAG_ONNX_CHECK: f"not exported: {error}"})
    log.warning("trial run %s: no ONNX model: %s", run_id, error)


def log_trial_onnx(tracker: Tracker, run_id: str, deployment: Deployment, example: torch.Tensor,
                   val: Iterable[tuple[torch.Tensor, torch.Tensor]], pytorch: ModelRecord) -> None:
    """Check a finished trial's deployed model's fast file (`deploy_trial_model`) on `val` (the config's
    val split, `val_batches`), log `onnx_top1`, `onnx_agreement`, `onnx_max_logit_diff`, `deployed_top1`
    (the deployed PyTorch model's), `onnx_size_mb` and the kernel counts of ONNX Runtime's optimized graph
    (`onnx_integer_kernels`, `onnx_float_kernels`; the `limpq.onnx_kernels` tag names the float ones) on
    the trial run, log the ONNX model and register it with the tags and aliases of the PyTorch version
    (`pytorch`): once per trial run. The compact form (INT4 packed, the smallest file) is logged as
    artifact `onnx/model-compact.onnx` with its size as `onnx_compact_size_mb`. A model ONNX Runtime
    cannot take, or an export below the agreement threshold, is not registered, and the run's
    `limpq.onnx_check` tag says why."""
    name = onnx_registered_name(pytorch.name)
    if tracker.model_versions(name, run_id):
        return
    export, model = deployment.export, deployment.model
    with tempfile.TemporaryDirectory() as directory:
        try:
            compact = export_onnx(model, example, Path(directory) / "model-compact.onnx", form="compact")
            kernels = runtime_kernels(export.path)
            agreement = compare_with_torch(model, export.path, val)
        except UserError as error:
            _not_exported(tracker, run_id, error)
            return
        tracker.log_metrics(run_id, {**agreement.metrics(), **kernels.metrics(), "deployed_top1": agreement.torch_top1,
                                     "onnx_size_mb": export.size_bytes / MEGABYTE,
                                     "onnx_compact_size_mb": compact.size_bytes / MEGABYTE}, step=pytorch.step)
        tracker.set_tags(run_id, {TAG_ONNX_KERNELS: kernels.summary()[:TAG_LIMIT]})
        tracker.log_artifact(run_id, compact.path, "onnx")
    uri = log_onnx_model(tracker, run_id, export.path, example, pytorch.step, tags={"format": "onnx-qdq", "form": "fast"})
    if not agreement.passed:
        message = f"not registered: {agreement.summary()}, below {100 * MIN_AGREEMENT:.1f}%"
        tracker.set_tags(run_id, {TAG_ONNX_CHECK: message})
        log.warning("trial run %s: ONNX model %s", run_id, message)
        return
    tracker.set_tags(run_id, {TAG_ONNX_CHECK: agreement.summary()})
    tags = {**pytorch.tags, "onnx_agreement": f"{agreement.agreement:.4f}",
            "onnx_max_logit_diff": f"{agreement.max_logit_diff:.3g}"}
    register_model(tracker, name, uri, run_id, tags, pytorch.aliases)


def set_onnx_alias(tracker: Tracker, pytorch_name: str, run_id: str, alias: str) -> None:
    """Point `alias` of the ONNX registered model at the version exported from `run_id` (the run
    whose PyTorch version got that alias), when there is one."""
    name = onnx_registered_name(pytorch_name)
    versions = tracker.model_versions(name, run_id)
    if versions:
        tracker.set_model_alias(name, alias, versions[0])
    else:
        log.warning("%s: run %s has no registered ONNX version; alias %s not moved", name, run_id, alias)


def onnx_row(metrics: Mapping[str, float], finished: bool) -> dict[str, float | None]:
    """The ONNX check's columns of a sweep summary row (empty for an unfinished trial)."""
    return {column: metrics.get(column) if finished else None for column in ONNX_COLUMNS}


# ------------------------------------------------------------------------------------ limpq export


def tracking_uri_for_export(option: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow 3's default sqlite:///mlflow.db, checked
    before anything reads it as `config validate` checks a store (checks/tracking_store.py); a sqlite
    database must also exist already: export reads a store the pipeline wrote, never makes one."""
    uri = option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    key = "--tracking-uri" if option else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else \
        "--tracking-uri (default sqlite:///mlflow.db)"
    if uri.startswith(SQLITE_PREFIX) and not Path(unquote(uri.removeprefix(SQLITE_PREFIX))).is_file():
        raise UserError(f"{key}: no MLflow database at {uri.removeprefix(SQLITE_PREFIX)}; give --tracking-uri or set "
                        "MLFLOW_TRACKING_URI to the store the pipeline wrote")
    check_tracking_store(uri, key)
    return uri


@dataclass(frozen=True)
class SourceModel:
    """A logged PyTorch model to export: its URI, the run that logged it, its input shape (C, H, W)."""

    uri: str
    run_id: str
    input_shape: tuple[int, ...]


def _pytorch_model_of(tracking_uri: str, uri: str, what: str) -> SourceModel:
    try:
        info = get_model_info(uri)
    except (MlflowException, OSError) as error:
        raise UserError(f"{what}: not found in MLflow at {redact(tracking_uri)} "
                        f"({first_line(error)[:200]})") from None
    if "pytorch" not in info.flavors:
        flavors = ", ".join(flavor for flavor in info.flavors if flavor != "python_function")
        raise UserError(f"{what}: holds a model of flavor {flavors or 'python_function'}, not pytorch; give the "
                        "PyTorch model's URI, e.g. models:/<name>-<arch>@best-top1")
    if info.signature is None or not info.signature.inputs.inputs:
        raise UserError(f"{what}: the model has no input signature, so its input shape is unknown")
    shape = tuple(info.signature.inputs.inputs[0].shape[1:])
    return SourceModel(uri, info.run_id, shape)


def resolve_source(tracking_uri: str, model_uri: str | None, run_id: str | None) -> SourceModel:
    """The PyTorch model behind `--model-uri` or `--run-id` (its newest logged PyTorch model)."""
    mlflow.set_tracking_uri(tracking_uri)  # get_model_info resolves models:/ URIs at the global store
    if model_uri is not None:
        return _pytorch_model_of(tracking_uri, model_uri, model_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--run-id {run_id}: no such run in MLflow at {redact(tracking_uri)}") from None
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")  # newest first
    if not logged:
        raise UserError(f"--run-id {run_id}: run {run.info.run_name!r} has no logged model; give a sweep trial's "
                        "run, or --model-uri models:/<name>-<arch>@<alias>")
    for model in logged:
        try:
            flavors = get_model_info(model.model_uri).flavors
        except (MlflowException, OSError) as error:
            raise UserError(f"--run-id {run_id}: its logged model {model.name!r} ({model.model_id}) cannot be read: "
                            f"{str(error).splitlines()[0][:200]}; give another run, or --model-uri") from None
        if "pytorch" in flavors:
            return _pytorch_model_of(tracking_uri, model.model_uri, f"--run-id {run_id}")
    raise UserError(f"--run-id {run_id}: run {run.info.run_name!r} has no logged PyTorch model")


@dataclass(frozen=True)
class ExportResult:
    export: OnnxExport
    fp32_bytes: int
    policy_size_mb: float | None
    random_check: OnnxAgreement
    kernels: RuntimeKernels


def export_logged_model(tracking_uri: str, source: SourceModel, out: Path, opset: int,
                        batch: int | None, form: str = "fast") -> ExportResult:
    """`limpq export`: the source model as ONNX QDQ in `form` at `out`, with the size of an FP32
    export of the same model, the kernels ONNX Runtime runs it with, and a check in ONNX Runtime on a
    few random images. Nothing is written to the store, and `out` only once every step passed."""
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        # MLflow's PyTorch flavor is a pickle of the whole module (see Tracker.log_model): loading it runs
        # code from the store, as mlflow.pytorch.load_model and `mlflow models serve` do. Downloaded into
        # a folder of ours: without dst_path, MLflow reads a local store's files in place and writes its
        # registered_model_meta file into the store's artifact folder
        model = mlflow.pytorch.load_model(source.uri, dst_path=directory, map_location="cpu").eval()
        if not any(isinstance(module, LsqQuantizer) for module in model.modules()):
            raise UserError(f"{source.uri}: a float model (it has no quantizer, as the fp stage's); limpq export "
                            "writes quantized models: give a sweep trial's, e.g. models:/<name>-<arch>@best-top1")
        example = torch.zeros(1, *source.input_shape)
        fp32_bytes = export_onnx(float_copy(model), example, Path(directory) / "fp32.onnx", opset=opset,
                                 batch=batch).size_bytes
        with replaced_on_success(out) as staging:  # a failure below leaves no file at `out`
            export = export_onnx(model, example, staging, opset=opset, batch=batch, form=form)
            kernels = runtime_kernels(staging)
            images = torch.randn(batch or 8, *source.input_shape, generator=torch.Generator().manual_seed(0))
            random_check = compare_with_torch(model, staging, [(images, torch.zeros(len(images), dtype=torch.long))])
    size = MlflowClient(tracking_uri=tracking_uri).get_run(source.run_id).data.metrics.get("size_mb") \
        if source.run_id else None
    return ExportResult(OnnxExport(out, export.quantized), fp32_bytes, size, random_check, kernels)
