"""Budget sweep on Ray Tune: one trial per budget (ILP search, then LSQ fine-tuning on Ray Train) and
one per uniform-precision baseline, with the same recipe; MLflow gets a parent run for the sweep and
a nested run per trial; the parent holds the summary table, the Pareto plot and bits-per-layer
charts.

A trial whose nested MLflow run already finished for the same settings reports the stored result
instead of training again, so a half-finished sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config import Budget, PipelineConfig
from orchestrator.distributed.runtime import ensure_ray
from orchestrator.distributed.train import storage_path, train_on_ray
from orchestrator.errors import UserError
from orchestrator.fileio import write_text_atomic
from orchestrator.indicators import load_indicators
from orchestrator.plots import pareto_plot, policy_bits_chart
from orchestrator.quant.export import export_quantized
from orchestrator.search.policy import policy_for_budget, uniform_policy_document
from orchestrator.tracking import Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from orchestrator.train.stages import fp_meta, finetune_model

FAIL_ONCE_ENV = "LIMPQ_TEST_TRIAL_FAIL_ONCE"  # test-only: "<trial label>:<marker file>"
# A trial only drives its TorchTrainer (whose workers reserve the real CPUs): a token share, since
# Tune refuses an empty resource request.
TRIAL_DRIVER_CPU = 0.01
SUMMARY_COLUMNS = ("budget", "kind", "status", "bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits",
                   "top1", "top5", "error")


@dataclass(frozen=True)
class TrialSpec:
    label: str
    kind: str  # "mpq" or "uniform"
    budget: dict[str, Any] | None = None  # Budget fields (mpq)
    bits: int | None = None  # uniform W{bits}A{bits}


def trial_specs(cfg: PipelineConfig) -> list[TrialSpec]:
    specs = [TrialSpec(b.label(), "mpq", budget=b.model_dump(exclude_none=True)) for b in cfg.search.budgets]
    specs += [TrialSpec(f"uniform-W{b}A{b}", "uniform", bits=b) for b in cfg.finetune.baselines]
    if not specs:
        raise UserError("search.budgets and finetune.baselines are both empty: nothing to sweep")
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"search.budgets: duplicate budget labels {duplicates}; give them distinct `name`s")
    return specs


def _policy_document(cfg: PipelineConfig, spec: TrialSpec, indicators_path: str) -> dict[str, Any]:
    if spec.kind == "uniform":
        return uniform_policy_document(cfg, spec.bits)
    return policy_for_budget(cfg, load_indicators(indicators_path), Budget(**spec.budget))


def _maybe_fail_once(label: str) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV, "")
    target, _, marker = spec.partition(":")
    if target == label and marker and not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError(f"test fault injection: trial {label} fails once")


def _trial_metrics(document: dict[str, Any]) -> dict[str, float]:
    keys = ("bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits")
    return {key: float(document[key]) for key in keys if document.get(key) is not None}


def sweep_trial(config: dict[str, Any]) -> None:
    """One Tune trial: the policy of its budget, fine-tuned on Ray Train, recorded in a nested run."""
    cfg: PipelineConfig = config["pipeline"]
    spec = TrialSpec(**config["trial"])
    tracker: Tracker = config["tracker"]
    parent = config["parent_run_id"]
    done = tracker.find_finished_stage_run(cfg, "trial", run_name=spec.label, parent_run_id=parent)
    if done is not None:
        tune.report({**tracker.get_run(done).data.metrics, "resumed_from_mlflow": 1.0})
        return
    run = tracker.open_stage_run(cfg, "trial", parent_run_id=parent, run_name=spec.label,
                                 extra_tags={"limpq.kind": spec.kind, "limpq.budget": spec.label})
    try:
        document = _policy_document(cfg, spec, config["indicators_path"])
    except UserError as error:
        # deterministic (an infeasible budget): recorded as this trial's failure, not retried
        tracker.finish(run.run_id, "FAILED", f"{type(error).__name__}: {error}")
        tune.report({"failed": 1.0, "error": str(error)})
        return
    with run:
        tracker.log_dict(run.run_id, document, "policy.json")
        tracker.log_params(run.run_id, {"trial.kind": spec.kind, "trial.budget": spec.label})
        tracker.log_metrics(run.run_id, _trial_metrics(document), step=0)
        _maybe_fail_once(spec.label)
        policy = {layer["name"]: (layer["wbits"], layer["abits"]) for layer in document["layers"]}
        inputs = {"fp_weights": config["fp_weights"], "joint_weights": config["joint_weights"], "policy": policy,
                  "report_extra": _trial_metrics(document)}
        state = train_on_ray(cfg, "finetune", tracker, run.run_id, f"{cfg.name}-trial-{spec.label}-{cfg.config_hash()}",
                             inputs, callbacks=[TuneReportCallback()])
        model = finetune_model(cfg, ray.get(config["fp_weights"]), policy)
        restore_model(model, state, f"fine-tuned checkpoint of trial {spec.label}")
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = save_checkpoint(Path(directory) / "finetuned.pt", model,
                                         meta={**fp_meta(cfg), "policy": document})
            export = Path(directory) / "export.pt"
            torch.save({**export_quantized(model), "policy": document}, export)
            chart = Path(directory) / "bits.png"
            policy_bits_chart(list(policy), [w for w, _ in policy.values()], [a for _, a in policy.values()], chart,
                              title=f"{cfg.model.arch} {spec.label}")
            for path, folder in ((checkpoint, "checkpoint"), (export, "checkpoint"), (chart, "plots")):
                tracker.log_artifact(run.run_id, path, folder)


def _trial_name(trial: Trial) -> str:
    return f"{trial.config['trial']['label']}-{trial.trial_id}"


def _concurrency(cfg: PipelineConfig) -> int | None:
    """The cap on trials running at once: `ray.max_concurrent_trials` when set. On a cluster whose head
    offers no CPUs, the mark of a cluster built to grow (ray_cluster.yaml, the KubeRay RayJob,
    cluster/local-up.sh with worker nodes), none: trials wait in Tune's queue for resources, and their
    pending requests are what makes the autoscaler add nodes. Elsewhere (the embedded local Ray, a
    one-node cluster) what fits now: each trial's Train workers plus one CPU for its Ray Data tasks,
    which would otherwise wait forever behind workers holding every CPU."""
    if cfg.ray.max_concurrent_trials:
        return cfg.ray.max_concurrent_trials
    heads = [node for node in ray.nodes() if node["Alive"] and "node:__internal_head__" in node["Resources"]]
    if heads and not heads[0]["Resources"].get("CPU"):
        return None
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1
    cpus = ray.cluster_resources().get("CPU", 1)
    if cfg.ray.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        return max(1, min(int(cpus // per_trial), int(gpus // (cfg.ray.num_workers * cfg.ray.gpus_per_worker))))
    return max(1, int(cpus // per_trial))


def _summary_rows(specs: list[TrialSpec], results: tune.ResultGrid) -> list[dict[str, Any]]:
    by_label = {}
    for result in results:
        label = result.config["trial"]["label"]
        metrics = result.metrics or {}
        error = metrics.get("error")
        if result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:300]
        by_label[label] = {"metrics": metrics, "error": error}
    rows = []
    for spec in specs:
        entry = by_label.get(spec.label, {"metrics": {}, "error": "trial did not run"})
        metrics = entry["metrics"]
        top1 = metrics.get("val_top1")
        rows.append({
            "budget": spec.label, "kind": spec.kind, "status": "failed" if entry["error"] else "ok",
            "bitops_g": metrics.get("bitops_g"), "size_mb": metrics.get("size_mb"),
            "compression_ratio": metrics.get("compression_ratio"), "avg_wbits": metrics.get("avg_wbits"),
            "avg_abits": metrics.get("avg_abits"), "top1": top1 if top1 is not None and not entry["error"] else None,
            "top5": metrics.get("val_top5") if not entry["error"] else None, "error": entry["error"],
        })
    return rows


def run_sweep(cfg: PipelineConfig, tracker: Tracker, fp_path: Path, indicators_path: Path,
              joint_path: Path | None) -> list[dict[str, Any]]:
    """Fan the budgets and baselines out on Ray Tune; returns the summary rows (one per trial)."""
    ensure_ray(cfg)
    specs = trial_specs(cfg)
    with tracker.open_stage_run(cfg, "sweep") as parent:
        param_space = {
            "pipeline": cfg, "tracker": tracker, "parent_run_id": parent.run_id,
            "indicators_path": str(Path(indicators_path).resolve()),
            "fp_weights": ray.put(load_checkpoint(fp_path)["model"]),
            "joint_weights": ray.put(load_checkpoint(joint_path)["model"])
            if joint_path is not None and cfg.finetune.init_from_indicators else None,
            "trial": tune.grid_search([asdict(spec) for spec in specs]),
        }
        scheduler = None
        if cfg.finetune.asha:
            scheduler = tune.schedulers.ASHAScheduler(max_t=max(1, cfg.finetune.epochs), grace_period=1)
        tuner = tune.Tuner(
            tune.with_resources(sweep_trial, {"CPU": TRIAL_DRIVER_CPU}),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=_concurrency(cfg), scheduler=scheduler,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                metric="val_top1" if scheduler else None, mode="max" if scheduler else None,
            ),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-sweep-{cfg.config_hash()}",
                storage_path=storage_path(cfg),
                failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                verbose=1,
            ),
        )
        rows = _summary_rows(specs, tuner.fit())
        _log_summary(cfg, tracker, parent.run_id, rows)
    return rows


def _log_summary(cfg: PipelineConfig, tracker: Tracker, run_id: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    out = cfg.run_dir / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        (c, pa.string() if c in ("budget", "kind", "status", "error") else pa.float64()) for c in SUMMARY_COLUMNS]))
    pa_csv.write_csv(table, out / "summary.csv")
    pq.write_table(table, out / "summary.parquet")
    pareto_plot([r for r in rows if r["top1"] is not None], out / "pareto.png",
                title=f"{cfg.model.arch} on {cfg.data.path}: top-1 vs BitOps")
    write_text_atomic(out / "report.txt", format_report(rows))
    for name in ("summary.csv", "summary.parquet", "report.txt"):
        tracker.log_artifact(run_id, out / name)
    tracker.log_artifact(run_id, out / "pareto.png", "plots")
    for row in rows:
        if row["top1"] is not None:
            tracker.log_metrics(run_id, {f"top1_{row['budget']}": row["top1"]}, step=0)
    for row in rows:
        if row["status"] == "ok":
            _log_bits_chart(cfg, tracker, run_id, row["budget"], out)
    failed = [row for row in rows if row["status"] == "failed"]
    tracker.set_tags(run_id, {"limpq.failed_trials": ",".join(r["budget"] for r in failed) or "none"})


def _log_bits_chart(cfg: PipelineConfig, tracker: Tracker, parent_run_id: str, label: str, out: Path) -> None:
    """The weight and activation bits per layer of a finished trial's policy, on the parent run."""
    trial = tracker.find_finished_stage_run(cfg, "trial", run_name=label, parent_run_id=parent_run_id)
    if trial is None:
        return
    document = json.loads(tracker.download_artifact(trial, "policy.json", out / "policies" / label).read_text())
    layers = document["layers"]
    chart = out / "policies" / f"{label}.png"
    policy_bits_chart([la["name"] for la in layers], [la["wbits"] for la in layers], [la["abits"] for la in layers],
                      chart, title=f"{cfg.model.arch} {label}")
    tracker.log_artifact(parent_run_id, chart, "plots/bits")


def read_summary(path: Path) -> list[dict[str, Any]]:
    """Rows of a summary.csv written by `_log_summary` (empty cells back to None)."""
    import pyarrow.csv as pa_csv

    types = {c: "string" if c in ("budget", "kind", "status", "error") else "float64" for c in SUMMARY_COLUMNS}
    options = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
    return pa_csv.read_csv(path, convert_options=options).to_pylist()


def _nearest_uniform(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    uniform = [r for r in rows if r["kind"] == "uniform" and r["top1"] is not None and r["bitops_g"] is not None]
    if row["bitops_g"] is None or not uniform:
        return None
    return min(uniform, key=lambda r: abs(math.log(r["bitops_g"] / row["bitops_g"])))


def format_report(rows: list[dict[str, Any]]) -> str:
    """The table the pipeline prints: budget, GBitOps, size, top-1, and MPQ vs the nearest uniform."""
    def number(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    lines = [f"{'budget':<22} {'kind':<8} {'GBitOps':>9} {'size MB':>8} {'top-1 %':>8}  vs uniform (nearest BitOps)"]
    for row in sorted(rows, key=lambda r: (r["bitops_g"] is None, r["bitops_g"] or 0.0)):
        versus = ""
        if row["kind"] == "mpq" and row["top1"] is not None:
            base = _nearest_uniform(row, rows)
            if base is not None:
                versus = f"{base['budget']}: {100 * base['top1']:.1f}% ({100 * (row['top1'] - base['top1']):+.1f})"
        top1 = number(100 * row["top1"] if row["top1"] is not None else None, ".1f")
        lines.append(f"{row['budget']:<22} {row['kind']:<8} {number(row['bitops_g'], '.4f'):>9} "
                     f"{number(row['size_mb'], '.3f'):>8} {top1:>8}  {versus}")
    for row in rows:
        if row["status"] == "failed":
            lines.append(f"FAILED {row['budget']}: {row['error']}")
    return "\n".join(lines)
