"""Does the search pay? Searched policies against random, uniform and anti-searched ones at equal BitOps.

For each model and seed: FP training and joint indicator training through the real pipeline path
(`orchestrator.distributed.run.run_indicators`: Ray Train, MLflow), then, on the joint model
WITHOUT fine-tuning (one-shot scoring, docs/method.md §9), for budgets spread between uniform W2A2 and W4A4 BitOps:
  - the searched policy (the ILP of docs/method.md §7 on the learned indicators),
  - uniform precision at equal or higher BitOps,
  - N random policies with BitOps in [0.98 B, B],
  - the anti-policy (the ILP's objective maximised instead of minimised, BitOps in the same
    [0.98 B, B] window: the layers the indicators call important get the fewest bits) as a control.
Then indicators against measured sensitivity: the val-loss increase when only one layer's weights
(or activations) drop from the highest candidate to a lower one, Spearman per bit; and at two
budgets, fine-tuning (Ray Train, the sweep's `train_on_ray(cfg, "finetune", ...)`) of the searched,
uniform and a few random policies with the same recipe, per seed.

FP weights are trained once per model (seed 0); the other seeds reuse them (fp.source: checkpoint)
and vary indicator training, the random policies and fine-tuning.

    python experiments/policy_quality.py --help
    python experiments/policy_quality.py                       # the README numbers (see docs/results.md)
    python experiments/policy_quality.py --quick               # a minute-scale check that it runs

An experiment, not a speed benchmark: it reuses the package's pipeline, scoring and search functions
and adds only what the experiment itself is (random policies in a BitOps window, the anti-policy,
the sensitivity sweep, the report).

Outputs: a results table on stdout, <workdir>/results.json, plots in --plots-dir, and an MLflow run
"policy-quality" (metrics + plots) in the benchmark's tracking store (<workdir>/mlflow.db).
Re-running with the same arguments reuses finished pipeline stages (MLflow) and cached results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import ray
import torch
from scipy.stats import spearmanr

from orchestrator.config.schema import Budget, PipelineConfig
from orchestrator.data.demo import write_digits_dataset
from orchestrator.data.layout import DatasetIndex, prepare_dataset
from orchestrator.data.local import build_datasets
from orchestrator.data.transforms import transforms_for
from orchestrator.distributed.run import run_indicators
from orchestrator.tracking.stages import finished_stage
from orchestrator.distributed.train import StageInputs, train_on_ray
from orchestrator.search.indicators import load_indicators
from orchestrator.checks.preflight import preflight
from orchestrator.search.ilp import Searcher
from orchestrator.search.mckp import solve_mckp
from orchestrator.checks.stage_keys import stage_keys
from orchestrator.tracking.runs import Tracker
from orchestrator.train.checkpoint import load_checkpoint, restore_model
from orchestrator.train.oneshot import loader_batches, policy_cost, score_policy
from orchestrator.train.recipe import make_criterion
from orchestrator.train.stages import finetune_model, untrained_joint_model
from orchestrator.train.steps import evaluate

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="candidate bit-widths")
    parser.add_argument("--budgets", type=int, default=5, help="BitOps budgets evenly spread strictly between uniform lowest and highest bits "
                        "(each interior uniform precision's BitOps is added as a budget too)")
    parser.add_argument("--random", type=int, default=20, help="random policies per budget")
    parser.add_argument("--fp-epochs", type=int, default=10)
    parser.add_argument("--indicator-epochs", type=int, default=3)
    parser.add_argument("--indicator-fraction", type=float, default=0.5, help="indicators.train_fraction")
    parser.add_argument("--finetune-models", nargs="*", default=["mobilenet_v2"],
                        help="models fine-tuned at two budgets (none: skip fine-tuning)")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-fraction", type=float, default=1.0)
    parser.add_argument("--finetune-random", type=int, default=3, help="random policies fine-tuned per budget")
    parser.add_argument("--sensitivity-seeds", type=int, nargs="*", default=None,
                        help="seeds whose per-layer sensitivity is measured (default: the first)")
    parser.add_argument("--sensitivity-bits", type=int, nargs="*", default=None,
                        help="bits the per-layer sensitivity is measured at (default: every candidate below the highest)")
    parser.add_argument("--val-samples", type=int, default=None,
                        help="score on a fixed random subset of this many val images (default: all)")
    parser.add_argument("--recalibrate-batches", type=int, default=0,
                        help="BN recalibration batches before each one-shot score (0: joint training's statistics)")
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/limpq-bench-policy-quality"))
    parser.add_argument("--plots-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="RESULTS.json",
                        help="only merge the results.json of earlier runs (e.g. one per model) into one report")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (one seed, 1 epoch each, 2 budgets, 5 random): checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.fp_epochs, args.indicator_epochs, args.budgets, args.random = [0], 1, 1, 2, 5
        args.finetune_epochs, args.finetune_random, args.finetune_fraction = 1, 1, 0.2
        args.indicator_fraction = 0.2
    if args.sensitivity_seeds is None:
        args.sensitivity_seeds = args.seeds[:1]
    if args.sensitivity_bits is None:
        args.sensitivity_bits = sorted(args.bits)[:-1]
    return args


# --- configs and the pipeline ------------------------------------------------------------------------


def pipeline_config(args: argparse.Namespace, arch: str, seed: int, data: Path, fp_checkpoint: Path | None) -> PipelineConfig:
    fp = ({"source": "checkpoint", "checkpoint": str(fp_checkpoint)} if fp_checkpoint is not None else
          {"epochs": args.fp_epochs, "lr": 0.05, "warmup_epochs": 1, "weight_decay": 5e-4})
    return PipelineConfig.model_validate({
        "name": f"quality-{arch}-s{seed}", "seed": seed, "output_dir": str(args.workdir / "runs"),
        "model": {"arch": arch, "num_classes": 10, "input_size": 32},
        "data": {"path": str(data), "batch_size": 64, "min_crop_scale": 0.6, "hflip": False},
        "fp": fp,
        "indicators": {"bits": args.bits, "epochs": args.indicator_epochs, "lr": 0.01,
                       "train_fraction": args.indicator_fraction},
        "search": {"alpha": args.alpha},
        "finetune": {"epochs": args.finetune_epochs, "lr": 0.01, "train_fraction": args.finetune_fraction},
        "ray": {"num_workers": 1, "cpus_per_worker": 2, "storage_path": str(args.workdir / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{args.workdir / 'mlflow.db'}", "experiment": "limpq-policy-quality"},
    }).with_absolute_paths()


def val_batches(cfg: PipelineConfig, dataset: DatasetIndex, samples: int | None = None) -> list:
    """The val split decoded once (as a list of batches), or a fixed random subset of `samples` images."""
    _, val = build_datasets(dataset, transforms_for(cfg.data, cfg.model.input_size), cfg.model.num_classes, cfg.seed)
    if samples is not None and samples < len(val):
        keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:samples]
        val = torch.utils.data.Subset(val, sorted(keep.tolist()))
    return list(loader_batches(val, 256, seed=0))


def calibration_batches(cfg: PipelineConfig, dataset: DatasetIndex, count: int) -> list:
    """The BN recalibration batches one-shot scoring uses (`ScoringData.calibration`), decoded once."""
    train, _ = build_datasets(dataset, transforms_for(cfg.data, cfg.model.input_size), cfg.model.num_classes,
                              cfg.seed, cfg.indicators.train_fraction)
    return list(loader_batches(train, cfg.data.batch_size, cfg.seed, count, shuffle=True))


# --- policies ----------------------------------------------------------------------------------------


def bitops_of(costs, policy: dict[str, tuple[int, int]]) -> float:
    return policy_cost(costs, policy).bitops_g


def random_policy_in_window(costs, bits: list[int], low: float, high: float, rng: random.Random,
                            max_moves: int = 20000) -> dict[str, tuple[int, int]]:
    """A random policy with BitOps in [low, high]: independent random (w, a) per layer, then random
    one-step moves (a random layer's weight or activation bits one candidate down while above the
    window, up while below) until inside."""
    ordered = sorted(bits)
    names = [layer.name for layer in costs.searchable]
    macs = {layer.name: layer.macs for layer in costs.searchable}
    policy = {name: (rng.choice(ordered), rng.choice(ordered)) for name in names}
    total = bitops_of(costs, policy)
    for _ in range(max_moves):
        if low <= total <= high:
            return policy
        name, which = rng.choice(names), rng.randrange(2)
        current = list(policy[name])
        index = ordered.index(current[which]) + (-1 if total > high else 1)
        if not 0 <= index < len(ordered):
            continue
        current[which] = ordered[index]
        candidate = total + macs[name] * (current[0] * current[1] - policy[name][0] * policy[name][1]) / 1e9
        if total < low and candidate > high:
            continue  # a step up that overshoots the window: try another layer
        policy[name], total = tuple(current), candidate
    raise RuntimeError(f"no random policy found in [{low}, {high}] G BitOps")


def searched_and_anti(indicators, costs, bits: list[int], alpha: float, budget_g: float):
    """The searched policy, and the anti-policy at equal BitOps: the same ILP objective *maximised*
    (the layers the indicators rank important get the fewest bits) with BitOps held in the random
    policies' window [0.98 B, B], solved by the search's own exact MCKP solver. Without the lower bound
    the maximum is uniform W2A2 at every budget, a floor rather than a control. Entries the search
    excludes (non-monotonic) stay excluded."""
    searcher = Searcher(indicators, costs, bits, bits, alpha)
    searched = searcher.solve(Budget(bitops_g=budget_g))
    bitops = searcher.macs[:, None] * (searcher.pair_w * searcher.pair_a)[None, :] / 1e9
    anti = solve_mckp(np.where(np.isfinite(searcher.cost), -searcher.cost, np.inf), np.stack([bitops, -bitops]),
                      np.array([budget_g, -0.98 * budget_g]))
    if anti is None:
        raise RuntimeError(f"no anti-policy in [{0.98 * budget_g:.4f}, {budget_g:.4f}] G BitOps")
    return ({layer.name: (layer.wbits, layer.abits) for layer in searched.layers},
            {name: (int(searcher.pair_w[column]), int(searcher.pair_a[column]))
             for name, column in zip(searcher.names, anti.choice)})


def percentile_beaten(score: float, others: list[float]) -> float:
    """Share of `others` strictly below `score`, ties counted half."""
    return sum(1.0 if o < score else 0.5 if o == score else 0.0 for o in others) / len(others)


# --- measurements ------------------------------------------------------------------------------------


def spearman(x: list[float], y: list[float]) -> float:
    return float(spearmanr(x, y).statistic)


def measure_budgets(args, cfg, model, costs, indicators, batches, calibration) -> list[dict]:
    bits = sorted(args.bits)
    low_g = bitops_of(costs, {n: (bits[0], bits[0]) for n in costs.names})
    high_g = bitops_of(costs, {n: (bits[-1], bits[-1]) for n in costs.names})
    spread = [low_g + (high_g - low_g) * (i + 1) / (args.budgets + 1) for i in range(args.budgets)]
    # plus each interior uniform precision's own BitOps: there uniform and searched compare at equal cost
    at_uniform = [bitops_of(costs, {n: (b, b) for n in costs.names}) for b in bits[1:-1]]
    budgets = sorted(spread + at_uniform)
    rng = random.Random(1000 + cfg.seed)
    score = lambda policy: score_policy(model, policy, batches, calibration_batches=calibration)  # noqa: E731
    rows = []
    for budget_g in budgets:
        searched, anti = searched_and_anti(indicators, costs, args.bits, args.alpha, budget_g)
        uniform_bits = next(b for b in bits if bitops_of(costs, {n: (b, b) for n in costs.names}) >= budget_g - 1e-12)
        uniform = {n: (uniform_bits, uniform_bits) for n in costs.names}
        randoms = [random_policy_in_window(costs, args.bits, 0.98 * budget_g, budget_g, rng) for _ in range(args.random)]
        random_scores = [score(p) for p in randoms]
        row = {
            "budget_g": budget_g, "budget_wa_equiv": math.sqrt(budget_g / low_g) * bits[0],
            "at_uniform": budget_g in at_uniform,
            "searched": {**score(searched), "bitops_g": bitops_of(costs, searched), "policy": searched},
            "uniform": {**score(uniform), "bitops_g": bitops_of(costs, uniform), "bits": uniform_bits},
            "anti": {**score(anti), "bitops_g": bitops_of(costs, anti)},
            "random_top1": [s["top1"] for s in random_scores], "random_loss": [s["loss"] for s in random_scores],
            "random_bitops_g": [bitops_of(costs, p) for p in randoms], "random_policies": randoms,
        }
        row["searched_beats_random"] = percentile_beaten(row["searched"]["top1"], row["random_top1"])
        rows.append(row)
        log.info("%s seed %d budget %.4f G: searched %.4f uniform-W%d %.4f random mean %.4f (beats %.0f%%) anti %.4f",
                 cfg.model.arch, cfg.seed, budget_g, row["searched"]["top1"], uniform_bits, row["uniform"]["top1"],
                 statistics.mean(row["random_top1"]), 100 * row["searched_beats_random"], row["anti"]["top1"])
    return rows


def measure_sensitivity(args, model, costs, indicators, batches, calibration) -> dict:
    """Val-loss increase when only one layer's weights (or activations) drop from the highest candidate
    to bit b; Spearman rank correlation with the indicators per bit and kind."""
    top = max(args.bits)
    base = {n: (top, top) for n in costs.names}
    base_loss = score_policy(model, base, batches, calibration_batches=calibration)["loss"]
    out: dict = {"base_loss": base_loss, "delta": {}, "spearman": {}}
    for kind, index in (("weight", 0), ("act", 1)):
        for b in args.sensitivity_bits:
            deltas = []
            for name in costs.names:
                policy = dict(base)
                pair = [top, top]
                pair[index] = b
                policy[name] = tuple(pair)
                deltas.append(score_policy(model, policy, batches, calibration_batches=calibration)["loss"] - base_loss)
            values = [getattr(indicators, kind)[name][b] for name in costs.names]
            out["delta"][f"{kind}{b}"] = deltas
            out["spearman"][f"{kind}{b}"] = spearman(values, deltas)
    return out


def finetune(args, cfg, dataset: DatasetIndex, label: str, policy: dict, fp_state: dict, joint_state: dict,
             batches) -> dict:
    tracker = Tracker.from_config(cfg)
    key = stage_keys(cfg, dataset.fingerprint).sweep
    with tracker.open_stage_run(cfg, "trial", key, run_name=label, extra_tags={"limpq.kind": "policy-quality"}) as run:
        inputs = StageInputs(fp_weights=ray.put(fp_state), joint_weights=ray.put(joint_state), policy=policy)
        state, _ = train_on_ray(cfg, dataset, "finetune", tracker, run.run_id, inputs, label=label)
    model = finetune_model(cfg.model, cfg.indicators.bits, fp_state, policy)
    restore_model(model, state, f"fine-tuned {label}")
    return evaluate(model, batches, make_criterion(cfg.finetune))


# --- report ------------------------------------------------------------------------------------------


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def report(results: dict, args) -> str:
    lines = ["## One-shot scores on the joint model (no fine-tuning), val top-1 %, mean ± std over seeds", ""]
    lines.append("| model | budget (G BitOps, ~WxAx) | searched | uniform (>= BitOps) | random mean | random best | "
                 "searched beats random | anti-policy |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for arch, per_seed in results["models"].items():
        seeds = list(per_seed.values())
        for i in range(len(seeds[0]["budgets"])):
            rows = [s["budgets"][i] for s in seeds]
            uniform_bits = rows[0]["uniform"]["bits"]
            lines.append(
                f"| {arch} | {rows[0]['budget_g']:.4f} "
                + (f"(= W{uniform_bits}A{uniform_bits}) " if rows[0].get("at_uniform") else
                   f"(~W{rows[0]['budget_wa_equiv']:.1f}A{rows[0]['budget_wa_equiv']:.1f}) ")
                + f"| {mean_spread([r['searched']['top1'] for r in rows])} "
                f"| W{uniform_bits}A{uniform_bits}: {mean_spread([r['uniform']['top1'] for r in rows])} "
                f"| {mean_spread([statistics.mean(r['random_top1']) for r in rows])} "
                f"| {mean_spread([max(r['random_top1']) for r in rows])} "
                f"| {', '.join('%.0f%%' % (100 * r['searched_beats_random']) for r in rows)} "
                f"| {mean_spread([r['anti']['top1'] for r in rows])} |")
    lines += ["", "## Indicators vs measured sensitivity (Spearman, per seed measured)", "",
              "| model | seed | bits: Spearman (weight / act) |", "|---|---|---|"]
    for arch, per_seed in results["models"].items():
        for seed, data in per_seed.items():
            if "sensitivity" in data:
                rho = data["sensitivity"]["spearman"]
                bits = sorted({int(key.removeprefix("weight").removeprefix("act")) for key in rho})
                lines.append(f"| {arch} | {seed} | " + "; ".join(
                    "%d-bit: %+.2f / %+.2f" % (b, rho[f"weight{b}"], rho[f"act{b}"]) for b in bits) + " |")
    if results.get("finetune"):
        lines += ["", "## After fine-tuning (val top-1 %, mean ± std over seeds)", "",
                  "| model | budget (G) | searched | uniform | random (mean of each seed's randoms) |", "|---|---|---|---|---|"]
        for arch, per_budget in results["finetune"].items():
            for budget, per_seed in per_budget.items():
                seeds = list(per_seed.values())
                lines.append(
                    f"| {arch} | {float(budget):.4f} | {mean_spread([s['searched'] for s in seeds])} "
                    f"| W{seeds[0]['uniform_bits']}A{seeds[0]['uniform_bits']}: {mean_spread([s['uniform'] for s in seeds])} "
                    f"| {mean_spread([statistics.mean(s['random']) for s in seeds])} |")
    return "\n".join(lines)


def plots(results: dict, args) -> list[Path]:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    args.plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    models = list(results["models"])
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, arch in zip(axes[0], models):
        for seed, data in results["models"][arch].items():
            first = seed == next(iter(results["models"][arch]))
            for row in data["budgets"]:
                axis.scatter(row["random_bitops_g"], [100 * t for t in row["random_top1"]], s=6, c="0.7",
                             label="random" if first and row is data["budgets"][0] else None)
            budget = [r["searched"]["bitops_g"] for r in data["budgets"]]
            axis.plot(budget, [100 * r["searched"]["top1"] for r in data["budgets"]], "o-", c="C0",
                      label="searched" if first else None)
            axis.plot([r["anti"]["bitops_g"] for r in data["budgets"]], [100 * r["anti"]["top1"] for r in data["budgets"]],
                      "x--", c="C3", label="anti-policy" if first else None)
            axis.plot([r["uniform"]["bitops_g"] for r in data["budgets"]],
                      [100 * r["uniform"]["top1"] for r in data["budgets"]], "s", c="C1",
                      label="uniform" if first else None)
        axis.set(title=f"{arch}: joint model, no fine-tuning", xlabel="BitOps (G, searchable layers)",
                 ylabel="val top-1 (%)")
        axis.legend()
    paths.append(args.plots_dir / "policy_quality_budgets.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    sensitivity = [(arch, seed, data["sensitivity"], data["indicators"]) for arch in models
                   for seed, data in results["models"][arch].items() if "sensitivity" in data]
    if sensitivity:
        figure, axes = plt.subplots(len(sensitivity), 2, figsize=(11, 4 * len(sensitivity)), squeeze=False)
        for row_axes, (arch, seed, sens, ind) in zip(axes, sensitivity):
            low_bits = sorted({int(key.removeprefix("weight").removeprefix("act")) for key in sens["spearman"]})
            for axis, kind in zip(row_axes, ("weight", "act")):
                for i, b in enumerate(low_bits):
                    key = f"{kind}{b}"
                    axis.scatter(ind[kind][str(b)], sens["delta"][key], s=10, c=f"C{i}",
                                 label=f"{b}-bit (Spearman {sens['spearman'][key]:+.2f})")
                axis.set(xscale="log", title=f"{arch} seed {seed}: {kind}", xlabel="indicator (learned step size)",
                         ylabel=f"val-loss increase, one layer from {max(args.bits)} bits")
                axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(args.plots_dir / "policy_quality_sensitivity.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def log_to_mlflow(results: dict, paths: list[Path], args, text: str) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{args.workdir / 'mlflow.db'}")
    mlflow.set_experiment("limpq-policy-quality")
    with mlflow.start_run(run_name="policy-quality"):
        mlflow.log_params({k: str(v) for k, v in vars(args).items()})
        for arch, per_seed in results["models"].items():
            for seed, data in per_seed.items():
                for i, row in enumerate(data["budgets"]):
                    mlflow.log_metrics({f"{arch}_s{seed}_searched_top1": row["searched"]["top1"],
                                        f"{arch}_s{seed}_uniform_top1": row["uniform"]["top1"],
                                        f"{arch}_s{seed}_random_mean_top1": statistics.mean(row["random_top1"]),
                                        f"{arch}_s{seed}_anti_top1": row["anti"]["top1"],
                                        f"{arch}_s{seed}_searched_beats_random": row["searched_beats_random"]}, step=i)
                if "sensitivity" in data:
                    mlflow.log_metrics({f"{arch}_s{seed}_spearman_{k}": v
                                        for k, v in data["sensitivity"]["spearman"].items()})
        for path in paths:
            mlflow.log_artifact(str(path), "plots")
        mlflow.log_text(text, "report.md")
        mlflow.log_dict(results, "results.json")


# --- main --------------------------------------------------------------------------------------------


def one_shot(args, arch: str, seed: int, data: Path, fp_checkpoint: Path | None, cache: Path) -> tuple:
    """Indicators through the pipeline, then every one-shot measurement of this model and seed (cached)."""
    checked = preflight(pipeline_config(args, arch, seed, data, fp_checkpoint), sweep=False)
    cfg, costs = checked.config, checked.costs
    dataset = checked.dataset or prepare_dataset(cfg.data)
    indicators_path = run_indicators(checked)
    keys = stage_keys(cfg, dataset.fingerprint)
    fp = finished_stage(cfg, Tracker.from_config(cfg), "fp", keys.fp)  # this seed's FP weights
    key = (f"{cfg.name}-{keys.indicators}-{args.budgets}-{args.random}-{args.alpha}-"
           f"{args.recalibrate_batches}-{args.val_samples}-{seed in args.sensitivity_seeds and args.sensitivity_bits}")
    cached = cache / f"{key}-with-uniform-budgets.json"  # the one-shot measurements (fine-tuning caches on key)
    if cached.is_file():
        measured = json.loads(cached.read_text())
    else:
        indicators = load_indicators(indicators_path)
        model = untrained_joint_model(cfg.model, cfg.indicators.bits)
        restore_model(model, load_checkpoint(indicators_path.parent / "joint.pt")["model"], "joint checkpoint")
        model.eval()
        batches = val_batches(cfg, dataset, args.val_samples)
        calibration = calibration_batches(cfg, dataset, args.recalibrate_batches) if args.recalibrate_batches else None
        measured = {"indicators": {kind: {str(b): [getattr(indicators, kind)[n][b] for n in costs.names]
                                          for b in args.bits} for kind in ("weight", "act")},
                    "budgets": measure_budgets(args, cfg, model, costs, indicators, batches, calibration)}
        if seed in args.sensitivity_seeds:
            measured["sensitivity"] = measure_sensitivity(args, model, costs, indicators, batches, calibration)
            log.info("%s seed %d Spearman %s", arch, seed, measured["sensitivity"]["spearman"])
        cached.write_text(json.dumps(measured))
    return cfg, dataset, key, measured, fp.file("fp.pt"), indicators_path.parent / "joint.pt"


def fine_tune_budgets(args, cfg, dataset: DatasetIndex, key: str, measured: dict, fp_checkpoint: Path,
                      joint_checkpoint: Path, cache: Path) -> dict:
    """At two budgets (a third and two thirds of the way up): searched, uniform and random policies
    fine-tuned with the config's recipe; {budget: {"searched", "uniform", "uniform_bits", "random"}}."""
    fp_state = load_checkpoint(fp_checkpoint)["model"]
    joint_state = load_checkpoint(joint_checkpoint)["model"]
    batches = val_batches(cfg, dataset, args.val_samples)
    spread = [row for row in measured["budgets"] if not row.get("at_uniform")]
    count = len(spread)
    out = {}
    for row in [spread[i] for i in sorted({count // 3, (2 * count) // 3})]:
        budget_key = f"{row['budget_g']:.6f}"
        ft_cache = cache / f"ft-{key}-{budget_key}-{args.finetune_epochs}-{args.finetune_fraction}-{args.finetune_random}.json"
        if ft_cache.is_file():
            out[budget_key] = json.loads(ft_cache.read_text())
            continue

        def tune(label: str, policy: dict) -> float:
            policy = {name: tuple(bits) for name, bits in policy.items()}
            return finetune(args, cfg, dataset, f"{label}-{budget_key}", policy, fp_state, joint_state, batches)["top1"]

        uniform_bits = row["uniform"]["bits"]
        entry = {"searched": tune("searched", row["searched"]["policy"]),
                 "uniform": tune(f"uniform{uniform_bits}", {n: (uniform_bits, uniform_bits) for n in row["searched"]["policy"]}),
                 "uniform_bits": uniform_bits,
                 "random": [tune(f"random{i}", p) for i, p in enumerate(row["random_policies"][:args.finetune_random])]}
        ft_cache.write_text(json.dumps(entry))
        log.info("%s seed %d fine-tuned at %s G: %s", cfg.model.arch, cfg.seed, budget_key, entry)
        out[budget_key] = entry
    return out


def finish(results: dict, args, started: float, argv: list[str] | None) -> str:
    text = report(results, args)
    text += (f"\n\nrun time {(time.monotonic() - started) / 60:.1f} min; command: "
             f"python experiments/policy_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    paths = plots(results, args)
    (args.workdir / "results.json").write_text(json.dumps(results, default=str))
    log_to_mlflow(results, paths, args, text)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.combine:
        merged: dict = {"models": {}, "finetune": {}, "runs": []}
        for path in args.combine:
            part = json.loads(path.read_text())
            merged["models"].update(part["models"])
            merged["finetune"].update(part.get("finetune", {}))
            merged["runs"].append(part.get("args"))
        finish(merged, args, started, argv)
        return 0
    data = args.workdir / "digits32"
    write_digits_dataset(data, image_size=32)
    if not os.environ.get("RAY_ADDRESS"):
        # our own local Ray: a bare ray.init() would join any cluster `ray start` left on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=300 * 1024**2,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    cache = args.workdir / "cache"
    cache.mkdir(exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}, "finetune": {}}
    done = []
    for arch in args.models:  # one-shot measurements of every model and seed first
        fp_checkpoint = None
        results["models"][arch] = {}
        for seed in args.seeds:
            cfg, dataset, key, measured, fp_path, joint_path = one_shot(args, arch, seed, data, fp_checkpoint, cache)
            fp_checkpoint = fp_checkpoint or fp_path  # seed 0's FP weights for every seed
            results["models"][arch][seed] = measured
            done.append((arch, cfg, dataset, key, measured, fp_checkpoint, joint_path))
    if args.finetune_models:
        finish(results, args, started, argv)  # the one-shot part, before the longer fine-tuning
        for arch, cfg, dataset, key, measured, fp_checkpoint, joint_path in done:
            if arch in args.finetune_models:
                for budget_key, entry in fine_tune_budgets(args, cfg, dataset, key, measured, fp_checkpoint, joint_path,
                                                           cache).items():
                    results["finetune"].setdefault(arch, {}).setdefault(budget_key, {})[cfg.seed] = entry
    finish(results, args, started, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
