"""The sweep's result: one summary row per trial, read from the trial runs in MLflow (so an
interrupted or failed trial can never show up as a result), logged to the sweep run as CSV, Parquet,
an MLflow table, a report, the Pareto plot and bits-per-layer charts, with the best-top1 aliases; and
the table the pipeline prints. MLflow work only: the Tune sweep (`orchestrator.distributed.sweep`)
calls it when its trials are done.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from orchestrator.common.fileio import write_text_atomic
from orchestrator.common.plots import pareto_plot, policy_bits_chart
from orchestrator.config.schema import PipelineConfig
from orchestrator.tracking.models import registered_model_name
from orchestrator.tracking.onnx_models import ONNX_COLUMNS, onnx_row, set_onnx_alias
from orchestrator.tracking.runs import TAG_ERROR, Tracker
from orchestrator.tracking.trials import ONE_SHOT, TrialSpec, evaluation_kind

SUMMARY_COLUMNS = ("budget", "policy", "seed", "kind", "status", "bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits",
                   "top1", "top5", *ONNX_COLUMNS, "epochs", "evaluation", "model_version", "run_id", "error")
TEXT_COLUMNS = ("budget", "policy", "kind", "status", "evaluation", "model_version", "run_id", "error")


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
        versions = tracker.model_versions(registered_model_name(cfg), run.info.run_id) if ok else []
        rows.append({
            "budget": spec.label, "policy": spec.policy_label, "seed": float(cfg.seed + spec.seed), "kind": spec.kind,
            "status": "ok" if ok else "failed",
            "bitops_g": metrics.get("bitops_g"), "size_mb": metrics.get("size_mb"),
            "compression_ratio": metrics.get("compression_ratio"), "avg_wbits": metrics.get("avg_wbits"),
            "avg_abits": metrics.get("avg_abits"), "top1": metrics.get("val_top1") if ok else None,
            "top5": metrics.get("val_top5") if ok else None, **onnx_row(metrics, ok),
            "epochs": metrics.get("epoch") if ok else None,
            "evaluation": evaluation_kind(cfg),
            "model_version": versions[0] if versions else None,
            "run_id": run.info.run_id if run is not None else None, "error": error,
        })
    return rows


def log_summary(cfg: PipelineConfig, tracker: Tracker, run_id: str, rows: list[dict[str, Any]]) -> None:
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
    tracker.log_table(run_id, {column: [row[column] for row in rows] for column in SUMMARY_COLUMNS},
                      "summary_table.json")
    tracker.log_artifact(run_id, out / "pareto.png", "plots")
    for row in rows:
        if row["status"] == "ok":
            _log_bits_chart(cfg, tracker, run_id, row, out)
    finished = [row for row in rows if row["top1"] is not None and row["model_version"]]
    if finished:
        best = max(finished, key=lambda row: row["top1"])
        tracker.set_model_alias(registered_model_name(cfg), "best-top1", best["model_version"])
        set_onnx_alias(tracker, registered_model_name(cfg), best["run_id"], "best-top1")
    failed = [row for row in rows if row["status"] == "failed"]
    tracker.set_tags(run_id, {"limpq.failed_trials": ",".join(r["budget"] for r in failed) or "none"})


def observed_concurrency(tracker: Tracker, sweep_run_id: str) -> int:
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


def read_finished_sweep(cfg: PipelineConfig, tracker: Tracker, root_run_id: str) -> list[dict[str, Any]] | None:
    """The summary rows of a finished pipeline's sweep run; None when that run is gone (deleted in the
    MLflow UI)."""
    sweep = next((run for run in tracker.child_runs(root_run_id) if run.data.tags.get("limpq.stage") == "sweep"), None)
    if sweep is None:
        return None
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
    """Rows of a summary.csv written by `log_summary` (empty cells back to None)."""
    types = {c: "string" if c in TEXT_COLUMNS else "float64" for c in SUMMARY_COLUMNS}
    options = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
    return pa_csv.read_csv(path, convert_options=options).to_pylist()


def _policies(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per policy (a budget or baseline over its fine-tuning seeds): its costs, and the
    mean, spread (sample standard deviation) and count of its finished trials' top-1 and ONNX columns."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("policy") or row["budget"], []).append(row)
    policies = []
    for label, members in groups.items():
        done = [row for row in members if row["top1"] is not None]
        entry = {"policy": label, "kind": members[0]["kind"], "seeds": len(done), "trials": len(members),
                 "bitops_g": next((r["bitops_g"] for r in members if r["bitops_g"] is not None), None),
                 "size_mb": next((r["size_mb"] for r in members if r["size_mb"] is not None), None)}
        for key in ("top1", "onnx_top1", "onnx_agreement"):
            values = [row[key] for row in done if row.get(key) is not None]
            entry[key] = sum(values) / len(values) if values else None
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        policies.append(entry)
    return policies


def _uniform_at_least(policy: dict[str, Any], uniform: list[dict[str, Any]], cost: str) -> dict[str, Any] | None:
    """The cheapest uniform baseline that costs at least as much as `policy` in `cost` (BitOps or
    size): the one a mixed policy must beat for the search to have paid at that cost."""
    above = [u for u in uniform if policy[cost] is not None and u[cost] >= policy[cost] * (1 - 1e-9)]
    return min(above, key=lambda u: u[cost]) if above else None


def _percent(entry: dict[str, Any], key: str = "top1") -> str:
    if entry.get(key) is None:
        return "-"
    spread = entry.get(key + "_std")
    return f"{100 * entry[key]:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def _relation(mixed: float, uniform: float) -> str:
    if math.isclose(mixed, uniform, rel_tol=1e-3):
        return "equal"
    return f"uniform {uniform / mixed:.2f}x" if mixed else "uniform more"


def _difference(mixed: dict[str, Any], uniform: dict[str, Any]) -> str:
    """The top-1 difference in points and what it shows: with two or more seeds each, its standard error
    over the fine-tuning seeds, and a verdict only outside two standard errors (within them the
    difference is the seeds' noise, and its sign can flip from one machine to another)."""
    delta = 100 * (mixed["top1"] - uniform["top1"])
    if mixed["top1_std"] is None or uniform["top1_std"] is None:
        return f"{delta:+.1f}, one seed: with finetune.seeds 2 or more the table tells a difference from noise"
    error = 100 * math.sqrt(mixed["top1_std"] ** 2 / mixed["seeds"] + uniform["top1_std"] ** 2 / uniform["seeds"])
    if abs(delta) <= 2 * error:
        return f"{delta:+.1f} ± {error:.1f}, within two standard errors over the seeds: no difference shown"
    return f"{delta:+.1f} ± {error:.1f}, {'mixed' if delta > 0 else 'uniform'} ahead beyond two standard errors"


def _comparisons(policies: list[dict[str, Any]]) -> list[str]:
    """Each searched policy against the cheapest uniform model of no lower BitOps and the cheapest of
    no smaller size (one line where they are the same model), with both costs of both sides, so a
    reader sees what each comparison holds equal and what it does not."""
    uniform = [p for p in policies if p["kind"] == "uniform" and p["top1"] is not None and p["bitops_g"] is not None]
    if not uniform:  # a sweep without baselines (or none finished) compares nothing
        return []
    lines = []
    for policy in policies:
        if policy["kind"] != "mpq" or policy["top1"] is None:
            continue
        bases = [_uniform_at_least(policy, uniform, cost) for cost in ("bitops_g", "size_mb")]
        if not any(bases):
            lines.append(f"  {policy['policy']}: no uniform baseline costs as much; add one to finetune.baselines")
        seen = []
        for base in bases:
            if base is None or base in seen:
                continue
            seen.append(base)
            lines.append(f"  {policy['policy']} {_percent(policy)} vs {base['policy']} {_percent(base)} "
                         f"({_difference(policy, base)}): "
                         f"GBitOps {policy['bitops_g']:.4g} vs {base['bitops_g']:.4g} "
                         f"({_relation(policy['bitops_g'], base['bitops_g'])}), "
                         f"size {policy['size_mb']:.3f} vs {base['size_mb']:.3f} MB "
                         f"({_relation(policy['size_mb'], base['size_mb'])})")
    return lines


def format_report(rows: list[dict[str, Any]]) -> str:
    """The table the pipeline prints: per policy (mean ± spread over its fine-tuning seeds) its
    BitOps, size, top-1 and ONNX agreement; then each searched policy against the uniform models of
    no lower BitOps and of no smaller size, saying what each comparison holds equal."""
    def number(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    policies = _policies(rows)
    seeded = any(p["trials"] > 1 for p in policies)
    top1_head = "top-1 % (mean ± std)" if seeded else "top-1 %"
    width = max(22, *(len(p["policy"]) for p in policies))
    lines = [f"{'policy':<{width}} {'kind':<8} {'GBitOps':>9} {'size MB':>8} {top1_head:>20} {'ONNX top-1 %':>12} "
             f"{'agree %':>7}" + ("  seeds" if seeded else "")]
    for entry in sorted(policies, key=lambda p: (p["bitops_g"] is None, p["bitops_g"] or 0.0, p["policy"])):
        agreement = number(100 * entry["onnx_agreement"] if entry["onnx_agreement"] is not None else None, ".2f")
        lines.append(f"{entry['policy']:<{width}} {entry['kind']:<8} {number(entry['bitops_g'], '.4f'):>9} "
                     f"{number(entry['size_mb'], '.3f'):>8} {_percent(entry):>20} {_percent(entry, 'onnx_top1'):>12} "
                     f"{agreement:>7}" + (f"  {entry['seeds']}/{entry['trials']}" if seeded else ""))
    comparisons = _comparisons(policies)
    if comparisons:
        lines.append("Mixed vs uniform precision: each searched policy against the cheapest uniform model with at "
                     "least its BitOps and the cheapest with at least its size (BitOps of the searchable layers, "
                     "size of all weights):")
        lines += comparisons
    for row in rows:
        if row["status"] == "failed":
            lines.append(f"FAILED {row['budget']}: {row['error']}")
    return "\n".join(lines)
