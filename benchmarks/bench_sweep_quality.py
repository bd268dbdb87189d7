"""Searched mixed precision vs uniform precision at equal BitOps, on the digits demo, over seeds.

For each seed the demo pipeline runs (FP -> indicators -> sweep) with two budgets, BitOps as uniform
W3A3 and W2A2, plus the uniform W3A3 and W2A2 baselines fine-tuned with the same recipe; with
`--compare-init` it runs the sweep twice per seed, fine-tuning from the FP weights alone and with
step sizes/BN from the joint-trained model (FP and indicator stages are reused from MLflow).
Results: mean and standard deviation of top-1 per policy; differences printed last.

    .venv/bin/python benchmarks/bench_sweep_quality.py --seeds 0 1 2 [--compare-init] [--out runs/quality]
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from orchestrator.config.loading import load_config
from orchestrator.distributed.run import run_pipeline
from orchestrator.checks.preflight import preflight

BUDGETS = [{"target_wbits": 3, "target_abits": 3}, {"target_wbits": 2, "target_abits": 2}]


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} +- {100 * std:4.1f} % (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compare-init", action="store_true", help="also fine-tune without the joint init")
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    inits = [True, False] if args.compare_init else [True]
    results: dict[tuple[bool, str], dict[int, float]] = {}
    failures = []
    for seed in args.seeds:
        for init in inits:
            cfg = load_config(args.config, {
                "name": f"quality-seed{seed}", "seed": seed, "output_dir": str(out / f"init{int(init)}"),
                "search.budgets": BUDGETS, "finetune.baselines": [3, 2], "finetune.init_from_indicators": init,
                "ray.storage_path": str(out / "ray"),
                "mlflow.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "mlflow.experiment": "quality",
            })
            for row in run_pipeline(preflight(cfg)):
                if row["top1"] is None:
                    failures.append(f"seed {seed} init={init} {row['budget']}: {row['error']}")
                    continue
                results.setdefault((init, row["budget"]), {})[seed] = row["top1"]
    print("\ntop-1 on the digits val split, mean +- std over seeds", args.seeds)
    for (init, budget), values in sorted(results.items()):
        print(f"  init_from_indicators={init!s:<5} {budget:<14} {spread(list(values.values()))}")
    for failure in failures:
        print("  FAILED", failure)
    print("MPQ minus uniform at equal BitOps (top-1 points, mean over seeds):")
    for init in inits:
        for bits in (3, 2):
            mpq, uniform = results.get((init, f"W{bits}A{bits}"), {}), results.get((init, f"uniform-W{bits}A{bits}"), {})
            deltas = [mpq[seed] - uniform[seed] for seed in args.seeds if seed in mpq and seed in uniform]
            if deltas:
                print(f"  init_from_indicators={init!s:<5} W{bits}A{bits}: {100 * statistics.mean(deltas):+.2f} "
                      f"(per seed: {', '.join(f'{100 * d:+.1f}' for d in deltas)})")


if __name__ == "__main__":
    main()
