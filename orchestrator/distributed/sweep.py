"""Budget sweep on Ray Tune: one trial per budget (ILP search, then LSQ fine-tuning on Ray Train,
or with `finetune.epochs: 0` a score of the joint model at the policy) and one per uniform-precision
baseline, with the same recipe. MLflow gets a sweep run (child of the pipeline's root run) and a
nested run per trial holding its policy, metrics and model; every finished trial's model is a
version of one registered model. The sweep run holds the summary (CSV, Parquet, an MLflow table),
the Pareto plot and bits-per-layer charts.

MLflow is the source of truth for what finished: a trial whose run already finished under the same
sweep run reports the stored result instead of training again, so a resubmitted sweep reruns only
failed and never-run trials. The summary is built from the trial runs, so an interrupted or failed
trial can never show up as a result.

Placement: a trial is a tiny driver; Train places its worker group, and Ray Data's tasks feed it
from CPUs outside the group. Trials are capped only by what the cluster can ever hold (its
autoscaler's maximum, else its current size, each trial counting its workers plus one CPU for its
data tasks) or by `ray.max_concurrent_trials`: trials beyond what runs now queue, and their pending
worker groups are what make an autoscaler add nodes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.experiment import Trial

from orchestrator.config import Budget, PipelineConfig, uniform_label
from orchestrator.distributed.capacity import cluster_capacity
from orchestrator.distributed.runtime import ensure_ray, started_local_ray
from orchestrator.distributed.train import example_input, log_dataset_inputs, storage_path, train_on_ray
from orchestrator.errors import UserError
from orchestrator.fileio import write_text_atomic
from orchestrator.indicators import Indicators, load_indicators
from orchestrator.plots import pareto_plot, policy_bits_chart
from orchestrator.quant.export import export_quantized
from orchestrator.search.policy import policy_for_budget, uniform_policy_document
from orchestrator.stagekeys import StageKeys
from orchestrator.tracking import TAG_ERROR, TAG_ROOT, Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from orchestrator.train.stages import INDICATORS_FILE, JOINT_FILE, FP_FILE, finetune_model, fp_meta

log = logging.getLogger("limpq")

# A fine-tuning trial only drives a Train worker group (whose workers reserve the CPUs and GPUs). It
# asks for memory alone: Tune refuses an empty request, and a token CPU share would leave nodes with
# less than the whole CPU a Ray Data task needs and keep drivers off a CPU-less head.
TRIAL_DRIVER_MEMORY = 512 * 2**20
# CPUs each running trial needs beside its workers' for the Ray Data tasks that feed them.
TRIAL_DATA_CPU = 1
SUMMARY_COLUMNS = ("budget", "kind", "status", "bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits",
                   "top1", "top5", "epochs", "evaluation", "model_version", "run_id", "error")
TEXT_COLUMNS = ("budget", "kind", "status", "evaluation", "model_version", "run_id", "error")
ONE_SHOT = "joint model, no fine-tuning"


@dataclass(frozen=True)
class TrialSpec:
    label: str
    kind: str  # "mpq" or "uniform"
    budget: dict[str, Any] | None = None  # Budget fields (mpq)
    bits: int | None = None  # uniform W{bits}A{bits}


@dataclass(frozen=True)
class SweepInputs:
    """What every trial needs, shipped once through the object store (`tune.with_parameters`)."""

    cfg: PipelineConfig
    tracker: Tracker
    sweep_key: str
    sweep_run_id: str
    root_run_id: str
    indicators: Indicators
    fp_weights: dict
    joint_weights: dict | None


def trial_specs(cfg: PipelineConfig) -> list[TrialSpec]:
    """One trial per budget and per uniform baseline (the schema keeps their labels distinct)."""
    specs = [TrialSpec(b.label(), "mpq", budget=b.model_dump(exclude_none=True)) for b in cfg.search.budgets]
    specs += [TrialSpec(uniform_label(b), "uniform", bits=b) for b in cfg.finetune.baselines]
    if not specs:
        raise UserError("search.budgets and finetune.baselines are both empty: nothing to sweep")
    return specs


def registered_model_name(cfg: PipelineConfig) -> str:
    return f"{cfg.name}-{cfg.model.arch.replace(':', '.')}"  # MLflow refuses ':' (a user's module:callable)


def model_alias(label: str) -> str:
    """A registered-model alias for a budget label (aliases allow letters, digits, '-' and '_')."""
    return "budget-" + re.sub(r"[^a-z0-9_-]+", "-", label.lower()).strip("-")


def _policy_document(cfg: PipelineConfig, spec: TrialSpec, indicators: Indicators) -> dict[str, Any]:
    if spec.kind == "uniform":
        return uniform_policy_document(cfg, spec.bits)
    return policy_for_budget(cfg, indicators, Budget(**spec.budget))


def _policy_metrics(document: dict[str, Any]) -> dict[str, float]:
    keys = ("bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits")
    return {key: float(document[key]) for key in keys if document.get(key) is not None}


def _description(cfg: PipelineConfig, spec: TrialSpec) -> str:
    what = (f"uniform W{spec.bits}A{spec.bits} baseline" if spec.kind == "uniform"
            else f"mixed-precision policy searched for budget {spec.label}")
    how = (f"scored with the joint model ({ONE_SHOT})" if cfg.finetune.epochs == 0
           else f"fine-tuned for {cfg.finetune.epochs} epochs")
    return f"{cfg.model.arch} at the {what}, {how}. Model registered as {registered_model_name(cfg)}."


def _score_one_shot(inputs: SweepInputs, label: str, policy: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The joint model's validation metrics at `policy` (SPEC 1.7), on this trial's CPUs: the same
    scoring as `limpq evaluate`."""
    from orchestrator.distributed.evaluate import score_on_this_node

    [row] = score_on_this_node(inputs.cfg, inputs.joint_weights, [(label, policy)],
                               inputs.cfg.finetune.bn_recalibration_batches)
    return {"val_top1": row["top1"], "val_loss": row["loss"], "val_samples": float(row["samples"])}


def sweep_trial(config: dict[str, Any], inputs: SweepInputs) -> None:
    """One Tune trial: the policy of its budget, fine-tuned (or scored with the joint model), recorded
    in a nested run whose model becomes a registered version."""
    cfg, tracker = inputs.cfg, inputs.tracker
    spec = TrialSpec(**config["trial"])
    done = tracker.find_finished_stage_run(cfg, "trial", inputs.sweep_key, run_name=spec.label,
                                           parent_run_id=inputs.sweep_run_id)
    if done is not None:
        tune.report({**tracker.get_run(done).data.metrics, "resumed_from_mlflow": 1.0})
        return
    run = tracker.open_stage_run(cfg, "trial", inputs.sweep_key, parent_run_id=inputs.sweep_run_id,
                                 run_name=spec.label, description=_description(cfg, spec),
                                 extra_tags={TAG_ROOT: inputs.root_run_id, "limpq.kind": spec.kind,
                                             "limpq.budget": spec.label, "limpq.node": socket.gethostname(),
                                             "limpq.ray_node_id": ray.get_runtime_context().get_node_id()})
    try:
        document = _policy_document(cfg, spec, inputs.indicators)
    except UserError as error:
        # deterministic (an infeasible budget): recorded as this trial's failure, not retried
        tracker.finish(run.run_id, "FAILED", f"{type(error).__name__}: {error}")
        tune.report({"failed": 1.0})
        return
    with run:
        policy = {layer["name"]: (layer["wbits"], layer["abits"]) for layer in document["layers"]}
        tracker.log_dict(run.run_id, document, "policy.json")
        tracker.log_params(run.run_id, {"trial.kind": spec.kind, "trial.budget": spec.label,
                                        "trial.evaluation": ONE_SHOT if cfg.finetune.epochs == 0 else "fine-tuned"})
        tracker.log_metrics(run.run_id, _policy_metrics(document), step=0)
        if cfg.finetune.epochs == 0:
            metrics = {**_policy_metrics(document), **_score_one_shot(inputs, spec.label, policy), "epoch": 0.0}
            tracker.log_metrics(run.run_id, metrics, step=0)
            model = finetune_model(cfg, inputs.fp_weights, policy, inputs.joint_weights)
        else:
            log_dataset_inputs(cfg, tracker, run.run_id, "finetune")
            weights = {"fp_weights": inputs.fp_weights, "joint_weights": inputs.joint_weights, "policy": policy,
                       "report_extra": _policy_metrics(document)}
            state, metrics = train_on_ray(cfg, "finetune", tracker, run.run_id,
                                          f"{cfg.name}-trial-{spec.label}-{inputs.sweep_key}", weights, label=spec.label)
            model = finetune_model(cfg, inputs.fp_weights, policy)
            restore_model(model, state, f"fine-tuned checkpoint of trial {spec.label}")
        _log_trial_outputs(inputs, spec, run.run_id, model, document, metrics)
        tune.report(metrics)


def _log_trial_outputs(inputs: SweepInputs, spec: TrialSpec, run_id: str, model: torch.nn.Module,
                       document: dict[str, Any], metrics: dict[str, float]) -> None:
    """Checkpoint, integer export and bits chart as artifacts; the model as an MLflow model and a
    version of the pipeline's registered model (once per trial run, also when a retry gets here)."""
    cfg, tracker = inputs.cfg, inputs.tracker
    policy = {layer["name"]: (layer["wbits"], layer["abits"]) for layer in document["layers"]}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = save_checkpoint(Path(directory) / "finetuned.pt", model, meta={**fp_meta(cfg), "policy": document})
        export = Path(directory) / "export.pt"
        torch.save({**export_quantized(model), "policy": document}, export)
        chart = Path(directory) / "bits.png"
        policy_bits_chart(list(policy), [w for w, _ in policy.values()], [a for _, a in policy.values()], chart,
                          title=f"{cfg.model.arch} {spec.label}")
        for path, folder in ((checkpoint, "checkpoint"), (export, "checkpoint"), (chart, "plots")):
            tracker.log_artifact(run_id, path, folder)
    name = registered_model_name(cfg)
    if tracker.model_versions_of_run(name, run_id):
        return
    epochs = int(metrics.get("epoch", 0))
    uri = tracker.log_model(run_id, model, example_input(cfg), name="model", step=epochs,
                            tags={"limpq.budget": spec.label, "limpq.kind": spec.kind})
    version_tags = {"budget": spec.label, "kind": spec.kind, "evaluation": ONE_SHOT if cfg.finetune.epochs == 0
                    else "fine-tuned", "top1": f"{metrics.get('val_top1', float('nan')):.4f}",
                    **{key: f"{value:.6g}" for key, value in _policy_metrics(document).items()}}
    tracker.register_model(name, uri, run_id, version_tags, aliases=[model_alias(spec.label)])


def _trial_name(trial: Trial) -> str:
    return f"{trial.config['trial']['label']}-{trial.trial_id}"


def _trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """A fine-tuning trial only drives its Train worker group; a one-shot trial scores in its own
    process, so it holds one worker's resources."""
    if cfg.finetune.epochs > 0:
        return {"memory": TRIAL_DRIVER_MEMORY}
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return resources


def _concurrency_cap(cfg: PipelineConfig) -> int | None:
    """`ray.max_concurrent_trials`, else as many trials as the cluster can ever hold at once (each
    trial's workers plus one CPU for its data tasks: more would starve the data tasks), else (a
    cluster that may grow) none: trials queue, and their pending worker groups make the autoscaler
    add nodes."""
    if cfg.ray.max_concurrent_trials:
        return cfg.ray.max_concurrent_trials
    capacity = dict(ray.cluster_resources()) if started_local_ray() else cluster_capacity()
    if capacity is None:
        return None
    cap = int(capacity.get("CPU", 0) // (cfg.ray.num_workers * cfg.ray.cpus_per_worker + TRIAL_DATA_CPU))
    if cfg.ray.use_gpu:
        cap = min(cap, int(capacity.get("GPU", 0) // (cfg.ray.num_workers * cfg.ray.gpus_per_worker)))
    return max(1, cap)


def trial_rows(cfg: PipelineConfig, tracker: Tracker, sweep_run_id: str, specs: list[TrialSpec],
               errors: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One summary row per trial, from its MLflow run: only a FINISHED run has results; a failed
    one carries its error, an unfinished one says so (with Tune's error when there is one)."""
    runs = {run.info.run_name: run for run in tracker.child_runs(sweep_run_id)}
    rows = []
    for spec in specs:
        run = runs.get(spec.label)
        metrics = run.data.metrics if run is not None else {}
        status = run.info.status if run is not None else None
        error = None
        if status != "FINISHED":
            error = (run.data.tags.get(TAG_ERROR) if run is not None else None) or (errors or {}).get(spec.label) \
                or ("trial did not finish" if run is not None else "trial did not run")
        ok = status == "FINISHED"
        versions = tracker.model_versions_of_run(registered_model_name(cfg), run.info.run_id) if ok else []
        rows.append({
            "budget": spec.label, "kind": spec.kind, "status": "ok" if ok else "failed",
            "bitops_g": metrics.get("bitops_g"), "size_mb": metrics.get("size_mb"),
            "compression_ratio": metrics.get("compression_ratio"), "avg_wbits": metrics.get("avg_wbits"),
            "avg_abits": metrics.get("avg_abits"), "top1": metrics.get("val_top1") if ok else None,
            "top5": metrics.get("val_top5") if ok else None, "epochs": metrics.get("epoch") if ok else None,
            "evaluation": ONE_SHOT if cfg.finetune.epochs == 0 else "fine-tuned",
            "model_version": versions[0] if versions else None,
            "run_id": run.info.run_id if run is not None else None, "error": error,
        })
    return rows


def _tune_errors(results: tune.ResultGrid) -> dict[str, str]:
    errors = {}
    for result in results:
        if result.error is not None and result.config:  # a trial that never started has no config
            errors[result.config["trial"]["label"]] = str(result.error).strip().splitlines()[-1][:300]
    return errors


def _observed_concurrency(tracker: Tracker, sweep_run_id: str) -> int:
    """The most trial runs that were running at the same time (from their start and end times)."""
    events = []
    for run in tracker.child_runs(sweep_run_id):
        if run.info.start_time and run.info.end_time:
            events += [(run.info.start_time, 1), (run.info.end_time, -1)]
    running = peak = 0
    for _, change in sorted(events):
        running += change
        peak = max(peak, running)
    return peak


def run_sweep(cfg: PipelineConfig, tracker: Tracker, keys: StageKeys, root_run_id: str, fp, indicators
              ) -> list[dict[str, Any]]:
    """Fan the budgets and baselines out on Ray Tune; returns the summary rows (one per trial). The
    sweep run ends FAILED when any trial did not finish (after writing the summary)."""
    ensure_ray(cfg)
    specs = trial_specs(cfg)
    description = (f"Budget sweep of {cfg.model.arch}: {len(specs)} trials ({'one-shot scores of the joint model' if cfg.finetune.epochs == 0 else 'LSQ fine-tuning'}); "
                   f"summary table, Pareto plot and bits per layer here, one child run per trial; indicators run "
                   f"{indicators.run_id}.")
    with tracker.open_stage_run(cfg, "sweep", keys.sweep, parent_run_id=root_run_id, description=description,
                                extra_tags={TAG_ROOT: root_run_id, "limpq.indicators_run_id": indicators.run_id,
                                            "limpq.registered_model": registered_model_name(cfg)}) as sweep:
        inputs = SweepInputs(
            cfg=cfg, tracker=tracker, sweep_key=keys.sweep, sweep_run_id=sweep.run_id, root_run_id=root_run_id,
            indicators=load_indicators(indicators.file(INDICATORS_FILE)),
            fp_weights=load_checkpoint(fp.file(FP_FILE))["model"],
            joint_weights=load_checkpoint(indicators.file(JOINT_FILE))["model"]
            if cfg.finetune.init_from_indicators or cfg.finetune.epochs == 0 else None,
        )
        cap = _concurrency_cap(cfg)
        tracker.set_tags(sweep.run_id, {"limpq.max_concurrent_trials": cap or "none: trials queue for resources",
                                        "limpq.trial_worker_group": json.dumps(
            {"workers": cfg.ray.num_workers, "cpus_per_worker": cfg.ray.cpus_per_worker,
             "gpus_per_worker": cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0})})
        # Ctrl-C must raise out of fit() (Tune would otherwise stop and return as if done).
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(sweep_trial, inputs=inputs), _trial_resources(cfg)),
            param_space={"trial": tune.grid_search([asdict(spec) for spec in specs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cap, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-sweep-{keys.sweep}",
                storage_path=storage_path(cfg),
                failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                verbose=0,  # trial tables stay off the console: the bars and the final table say it
            ),
        )
        log.info("sweep: %d trials (%s), at most %s at once", len(specs), ", ".join(spec.label for spec in specs),
                 cap or "as many as the cluster grows to")
        results = tuner.fit()
        rows = trial_rows(cfg, tracker, sweep.run_id, specs, _tune_errors(results))
        tracker.log_metrics(sweep.run_id, {"max_concurrent_trials_observed": _observed_concurrency(
            tracker, sweep.run_id)}, step=0)
        _log_summary(cfg, tracker, sweep.run_id, rows)
        failed = [row["budget"] for row in rows if row["status"] != "ok"]
        if failed:
            sweep.fail(f"{len(failed)} of {len(rows)} trials did not finish: {', '.join(failed)}")
    return rows


def _log_summary(cfg: PipelineConfig, tracker: Tracker, run_id: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    out = cfg.run_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        (c, pa.string() if c in TEXT_COLUMNS else pa.float64()) for c in SUMMARY_COLUMNS]))
    pa_csv.write_csv(table, out / "summary.csv")
    pq.write_table(table, out / "summary.parquet")
    label = f" ({ONE_SHOT})" if cfg.finetune.epochs == 0 else ""
    pareto_plot([r for r in rows if r["top1"] is not None], out / "pareto.png",
                title=f"{cfg.model.arch} on {Path(cfg.data.path).name}: top-1 vs BitOps{label}")
    write_text_atomic(out / "report.txt", format_report(rows))
    for name in ("summary.csv", "summary.parquet", "report.txt"):
        tracker.log_artifact(run_id, out / name)
    tracker.log_table(run_id, rows, "summary_table.json")
    tracker.log_artifact(run_id, out / "pareto.png", "plots")
    for row in rows:
        if row["status"] == "ok":
            _log_bits_chart(cfg, tracker, run_id, row, out)
    finished = [row for row in rows if row["top1"] is not None and row["model_version"]]
    if finished:
        best = max(finished, key=lambda row: row["top1"])
        tracker.set_model_alias(registered_model_name(cfg), "best-top1", best["model_version"])
    failed = [row for row in rows if row["status"] == "failed"]
    tracker.set_tags(run_id, {"limpq.failed_trials": ",".join(r["budget"] for r in failed) or "none"})


def read_finished_sweep(cfg: PipelineConfig, tracker: Tracker, root_run_id: str) -> list[dict[str, Any]]:
    """The summary rows of a finished pipeline's sweep run."""
    sweep = next(run for run in tracker.child_runs(root_run_id) if run.data.tags.get("limpq.stage") == "sweep")
    return read_summary(tracker.download_artifact(sweep.info.run_id, "summary.csv",
                                                  cfg.run_dir / sweep.info.run_id / ".fetch"))


def _log_bits_chart(cfg: PipelineConfig, tracker: Tracker, sweep_run_id: str, row: dict[str, Any], out: Path) -> None:
    """The weight and activation bits per layer of a finished trial's policy, on the sweep run."""
    label = row["budget"]
    document = json.loads(tracker.download_artifact(row["run_id"], "policy.json", out / "policies" / label).read_text())
    layers = document["layers"]
    chart = out / "policies" / f"{label}.png"
    policy_bits_chart([la["name"] for la in layers], [la["wbits"] for la in layers], [la["abits"] for la in layers],
                      chart, title=f"{cfg.model.arch} {label}")
    tracker.log_artifact(sweep_run_id, chart, "plots/bits")


def read_summary(path: Path) -> list[dict[str, Any]]:
    """Rows of a summary.csv written by `_log_summary` (empty cells back to None)."""
    import pyarrow.csv as pa_csv

    types = {c: "string" if c in TEXT_COLUMNS else "float64" for c in SUMMARY_COLUMNS}
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
