"""End to end: the demo config's indicator training and fine-tuning with `training.compile: off` and `on`,
through the real pipeline (Ray Train, Ray Tune, MLflow); the compilation cost against the time it
saves per epoch. Ratios and the break-even point are printed last.

Each mode runs the pipeline once from a fresh FP initialisation (fp.epochs 0: speed does not depend
on the weights), with one searched budget and no baselines, so the sweep is one fine-tuning trial.
Every worker is a fresh process: it compiles anew, served by inductor's on-disk caches when an
earlier run on this machine compiled the same graph (pass --cold to point them at an empty folder).
The numbers are the ones the workers logged to MLflow: images/s per epoch (the first epoch's includes
the compilation) and compile_seconds.

    .venv/bin/python benchmarks/bench_compile.py [--config jobs/configs/demo.yaml] [--epochs 2] [--cold]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from orchestrator.config.loading import load_config
from orchestrator.distributed.run import run_pipeline
from orchestrator.checks.preflight import preflight
from orchestrator.tracking.runs import Tracker

MODES = ("off", "on")


def stage_epochs(tracker: Tracker, stage: str) -> dict[str, list[float]]:
    """images_per_second by epoch and the compile seconds of the one finished run of `stage`."""
    [run] = tracker.client.search_runs([tracker.experiment_id], f"tags.`limpq.stage` = '{stage}'")
    history = tracker.client.get_metric_history(run.info.run_id, "images_per_second")
    compile_seconds = run.data.metrics.get("compile_seconds")
    return {"images_per_second": [m.value for m in sorted(history, key=lambda m: m.step)],
            "compile_seconds": [] if compile_seconds is None else [compile_seconds],
            "tag": [run.data.tags.get("limpq.compile", "")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=2, help="indicator and fine-tuning epochs per run")
    parser.add_argument("--out", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--cold", action="store_true", help="start inductor's caches empty (a new machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-compile-")).resolve()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out / "inductor-cache")  # Ray workers inherit it
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    dataset = None
    for mode in MODES:
        base = load_config(args.config)
        cfg = load_config(args.config, {
            "name": f"bench-compile-{mode}-{int(time.time())}", "output_dir": str(out / mode),
            "fp.epochs": 0, "indicators.epochs": args.epochs, "finetune.epochs": args.epochs,
            "search.budgets": [base.search.budgets[0].model_dump(exclude_none=True)], "finetune.baselines": [],
            "training.compile": mode, "ray.storage_path": str(out / mode / "ray"),
            "mlflow.tracking_uri": f"sqlite:///{out / mode / 'mlflow.db'}", "mlflow.experiment": "bench-compile",
        })
        started = time.perf_counter()
        checked = preflight(cfg)
        dataset = checked.dataset
        run_pipeline(checked)
        wall = time.perf_counter() - started
        tracker = Tracker.from_config(cfg)
        results[mode] = {stage: stage_epochs(tracker, stage) for stage in ("indicators", "trial")}
        print(f"compile {mode}: pipeline wall time {wall:.0f} s")
    print(f"\n{'stage':<12}{'mode':<6}{'images/s by epoch':<28}{'compile s':>10}")
    for stage in ("indicators", "trial"):
        for mode in MODES:
            row = results[mode][stage]
            rates = ", ".join(f"{r:.1f}" for r in row["images_per_second"])
            compiled = f"{row['compile_seconds'][0]:.0f}" if row["compile_seconds"] else "-"
            print(f"{stage:<12}{mode:<6}{rates:<28}{compiled:>10}   ({row['tag'][0]})")
    print("ratios (compiled / eager images/s, the last epoch; break-even: compile seconds / seconds saved per epoch):")
    for stage, recipe in (("indicators", cfg.indicators), ("trial", cfg.finetune)):
        per_epoch = dataset.count("train", recipe.train_fraction, cfg.seed)
        eager_rate = results["off"][stage]["images_per_second"][-1]
        compiled_rate = results["on"][stage]["images_per_second"][-1]
        saved = per_epoch / eager_rate - per_epoch / compiled_rate
        compile_seconds = (results["on"][stage]["compile_seconds"] or [float("nan")])[0]
        even = f"{compile_seconds / saved:.1f} epochs" if saved > 0 else "never (compiled is not faster)"
        name = "indicator training" if stage == "indicators" else "fine-tuning"
        print(f"  {name}: {compiled_rate / eager_rate:.2f}x images/s; saves {saved:.1f} s per epoch of {per_epoch} "
              f"images, compiling costs {compile_seconds:.0f} s: break-even after {even}")


if __name__ == "__main__":
    main()
