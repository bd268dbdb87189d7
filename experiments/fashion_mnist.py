"""The Fashion-MNIST study of docs/results.md: does mixed precision pay on data harder than the digits?

Everything trains through the product (`limpq run`, `limpq evaluate`); this script only prepares
inputs and reads results. `experiments/fashion_mnist.sh` runs the whole study:

    prepare   Fashion-MNIST (Debian's dataset-fashion-mnist) -> a balanced image-folder subset; the
              budgets (uniform W3A3 / W4A4 BitOps, uniform W3 / W4 size); random policies of equal
              BitOps; three pipeline configs sharing one FP model and one joint indicator training
              (same name and stage keys): LIMPQ indicators + uniform baselines, Hessian-trace scores,
              random policies fine-tuned as given
    policies  the searched policies of both sweeps, from MLflow, as files for `limpq evaluate`
    report    the table (mean ± std over fine-tuning seeds) and the Pareto plot, from MLflow and the
              one-shot scores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from orchestrator.search.costs import cost_table
from orchestrator.search.policy import POLICY_FORMAT, uniform_baseline
from orchestrator.train.oneshot import policy_cost

CLASSES = "t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle-boot"
BITS = [6, 5, 4, 3, 2]
ARCH, INPUT_SIZE, NUM_CLASSES = "resnet18", 32, 10
RANDOM_FINETUNED = 2  # per BitOps budget, fine-tuned once each
RANDOM_ONE_SHOT = 25  # per BitOps budget, scored with the joint model (the fine-tuned ones among them)
SEEDS = 3  # fine-tuning seeds of the LIMPQ policies and the uniform models (the Hessian ones: 2)


def base_config(work: Path) -> dict:
    return {
        "name": "fmnist", "seed": 0, "output_dir": str(work / "runs"),
        "model": {"arch": ARCH, "num_classes": NUM_CLASSES, "input_size": INPUT_SIZE},
        "data": {"format": "folder", "path": str(work / "fmnist"), "batch_size": 64, "min_crop_scale": 0.5},
        "fp": {"source": "train", "epochs": 15, "lr": 0.05, "warmup_epochs": 1, "weight_decay": 5.0e-4},
        "indicators": {"bits": BITS, "epochs": 4, "lr": 0.01, "train_fraction": 0.5},
        "search": {"alpha": 2.0, "cost_model": "exact", "budgets": []},
        "finetune": {"epochs": 2, "lr": 0.01, "baselines": [], "seeds": SEEDS},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2,
                "storage_path": str(work / "runs" / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "fmnist-study"},
    }


def random_policy(costs, low: float, high: float, rng: random.Random) -> dict[str, tuple[int, int]]:
    """Independent random (w, a) per layer, then random one-step moves toward the window until its
    BitOps lie in [low, high]."""
    names = [layer.name for layer in costs.searchable]
    ordered = sorted(BITS)
    policy = {name: (rng.choice(ordered), rng.choice(ordered)) for name in names}
    for _ in range(50_000):
        total = policy_cost(costs, policy).bitops_g
        if low <= total <= high:
            return policy
        name, which = rng.choice(names), rng.randrange(2)
        pair = list(policy[name])
        index = ordered.index(pair[which]) + (-1 if total > high else 1)
        if 0 <= index < len(ordered):
            pair[which] = ordered[index]
            candidate = dict(policy, **{name: tuple(pair)})
            if total < low and policy_cost(costs, candidate).bitops_g > high:
                continue
            policy = candidate
    raise RuntimeError(f"no random policy in [{low}, {high}] G BitOps")


def write_policy(path: Path, policy: dict[str, tuple[int, int]], label: str) -> None:
    document = {"format": POLICY_FORMAT, "model": ARCH, "input_size": INPUT_SIZE, "label": label,
                "layers": [{"name": name, "wbits": w, "abits": a} for name, (w, a) in policy.items()]}
    path.write_text(json.dumps(document, indent=1))


def prepare(work: Path) -> None:
    costs = cost_table(ARCH, INPUT_SIZE, num_classes=NUM_CLASSES)
    uniform = {b: uniform_baseline(costs, b).totals for b in BITS}
    budgets = [
        {"name": "bitops-W3A3", "target_wbits": 3, "target_abits": 3},
        {"name": "bitops-W4A4", "target_wbits": 4, "target_abits": 4},
        # at uniform W{b}'s size; the activations average b bits, as the uniform model's do
        {"name": "size-W3", "size_mb": round(uniform[3].size_mb, 6), "avg_abits": 3},
        {"name": "size-W4", "size_mb": round(uniform[4].size_mb, 6), "avg_abits": 4},
    ]
    rng = random.Random(0)
    (work / "policies" / "random").mkdir(parents=True, exist_ok=True)
    random_budgets, one_shot = [], []
    for bits in (3, 4):
        high = uniform[bits].bitops_g
        for index in range(RANDOM_ONE_SHOT):
            label = f"random-W{bits}A{bits}-{index}"
            path = work / "policies" / "random" / f"{label}.json"
            write_policy(path, random_policy(costs, 0.98 * high, high, rng), label)
            one_shot.append(str(path))
            if index < RANDOM_FINETUNED:
                random_budgets.append({"policy": str(path)})
    configs = {
        "limpq": {"search": {"budgets": budgets}, "finetune": {"baselines": [3, 4]}},
        # HAWQ has no alpha: the weight and activation terms count equally (docs/method.md §5)
        "hessian": {"search": {"budgets": budgets, "scores": "hessian", "alpha": 1.0}, "finetune": {"seeds": 2}},
        "random": {"search": {"budgets": random_budgets}, "finetune": {"seeds": 1}},
    }
    for name, changes in configs.items():
        config = base_config(work)
        for section, values in changes.items():
            config[section].update(values)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "policies" / "one_shot_random.txt").write_text("\n".join(one_shot) + "\n")
    print(f"{work}: configs limpq.yaml, hessian.yaml, random.yaml; {len(one_shot)} random policies; uniform "
          + ", ".join(f"W{b}A{b} {uniform[b].bitops_g:.4f} G / {uniform[b].size_mb:.3f} MB" for b in (2, 3, 4)))


def _tracker(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("fmnist-study")
    return client, experiment.experiment_id


def _sweep_trials(work: Path) -> list[dict]:
    """Every finished trial run of the study's sweeps, with its sweep's scoring method."""
    client, experiment_id = _tracker(work)
    sweeps = client.search_runs([experiment_id], "tags.`limpq.stage` = 'sweep' and attributes.status = 'FINISHED'")
    trials = []
    for sweep in sweeps:
        scores = sweep.data.params.get("search.scores", "limpq")
        for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'"):
            if run.info.status != "FINISHED":
                continue
            kind = run.data.tags.get("limpq.kind")
            method = {"uniform": "uniform", "given": "random"}.get(kind, scores)
            trials.append({"run_id": run.info.run_id, "method": method, "kind": kind,
                           "policy": run.data.tags.get("limpq.policy_label") or run.info.run_name,
                           "top1": run.data.metrics.get("val_top1"), "bitops_g": run.data.metrics.get("bitops_g"),
                           "size_mb": run.data.metrics.get("size_mb"),
                           "agreement": run.data.metrics.get("onnx_agreement")})
    return trials


def policies(work: Path) -> None:
    client, _ = _tracker(work)
    out = work / "policies" / "searched"
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for trial in _sweep_trials(work):
        name = f"{trial['method']}-{trial['policy']}"
        if trial["kind"] != "mpq" or name in seen:
            continue
        seen.add(name)
        with tempfile.TemporaryDirectory() as directory:
            document = json.loads(Path(client.download_artifacts(trial["run_id"], "policy.json", directory)).read_text())
        document["label"] = name
        (out / f"{name}.json").write_text(json.dumps(document, indent=1))
        print(out / f"{name}.json")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report(work: Path, out: Path) -> None:
    trials = _sweep_trials(work)
    one_shot = {Path(row["policy"]).stem: row for row in json.loads((work / "oneshot.json").read_text())}
    groups: dict[tuple[str, str], list[dict]] = {}
    for trial in trials:
        groups.setdefault((trial["method"], trial["policy"]), []).append(trial)
    rows = []
    for (method, label), members in groups.items():
        if method == "random":
            label = label.removeprefix("policy-")
        shot = one_shot.get(f"{method}-{label}") or one_shot.get(label)
        rows.append({"method": method, "policy": label, "bitops_g": members[0]["bitops_g"],
                     "size_mb": members[0]["size_mb"], "top1": [m["top1"] for m in members],
                     "agreement": min(m["agreement"] for m in members if m["agreement"] is not None),
                     "one_shot": shot["top1"] if shot else None})
    rows.sort(key=lambda r: (r["bitops_g"], r["method"], r["policy"]))
    lines = ["| method | policy | G BitOps | size MB | fine-tuned top-1 % (mean ± std) | runs | one-shot top-1 % |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['policy']} | {row['bitops_g']:.4f} | {row['size_mb']:.3f} | "
                     f"{_mean_std(row['top1'])} | {len(row['top1'])} | "
                     f"{_percent(row['one_shot'])} |")
    random_shots = [r for r in one_shot.values() if "random" in r["policy"]]
    for bits in (3, 4):
        scores = [r["top1"] for r in random_shots if f"W{bits}A{bits}" in Path(r["policy"]).name]
        if scores:
            lines.append(f"| random (one-shot only) | {len(scores)} at uniform W{bits}A{bits} BitOps | | | | | "
                         f"{_mean_std(scores)} (best {100 * max(scores):.1f}) |")
    (out / "fashion_mnist_rows.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, random_shots, out / "fashion_mnist_pareto.png")
    print("\n".join(lines))


def _plot(rows: list[dict], random_shots: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"uniform": ("s", "black"), "limpq": ("o", "tab:blue"), "hessian": ("^", "tab:orange"),
             "random": ("x", "tab:gray")}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, cost, unit in ((axes[0], "bitops_g", "G BitOps (searchable layers)"), (axes[1], "size_mb", "MB")):
        for method, (marker, color) in style.items():
            chosen = [r for r in rows if r["method"] == method]
            if not chosen:
                continue
            axis.errorbar([r[cost] for r in chosen], [100 * statistics.fmean(r["top1"]) for r in chosen],
                          yerr=[100 * statistics.stdev(r["top1"]) if len(r["top1"]) > 1 else 0 for r in chosen],
                          fmt=marker, color=color, label=method, capsize=3)
        axis.set_xlabel(unit)
        axis.set_ylabel("val top-1 % (fine-tuned)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("resnet18 on Fashion-MNIST (3,000 train / 2,000 val, 32x32): fine-tuned top-1 vs cost")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "policies", "report"])
    parser.add_argument("--work", type=Path, required=True, help="study directory (data, configs, MLflow store)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where report writes the table and plot")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    {"prepare": lambda: prepare(args.work), "policies": lambda: policies(args.work),
     "report": lambda: report(args.work, args.out)}[args.step]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
