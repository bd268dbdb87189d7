"""Joint indicator training throughput on Ray Train with 1 and 2 workers (one CPU and torch thread
each), on the digits demo data.

Each run trains the indicator stage for one epoch (FP weights: a fresh init, as speed does not
depend on them) and reads the images/s the workers measured; the 2-vs-1 ratio is printed last.

    .venv/bin/python benchmarks/bench_train_throughput.py [--fraction 0.5] [--out runs/throughput]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from orchestrator.config.loading import load_config
from orchestrator.data.layout import prepare_dataset
from orchestrator.distributed.run import run_indicators
from orchestrator.checks.preflight import preflight
from orchestrator.checks.stage_keys import stage_keys
from orchestrator.tracking.runs import Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--out", default="runs/throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    rates = {}
    for workers in (1, 2):
        cfg = load_config(args.config, {
            "name": f"throughput-{workers}w-{int(time.time())}", "output_dir": str(out), "fp.epochs": 0,
            "indicators.epochs": 1, "indicators.train_fraction": args.fraction, "ray.num_workers": workers,
            "ray.cpus_per_worker": 1,
            "ray.storage_path": str(out / "ray"),
            "mlflow.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "mlflow.experiment": "throughput",
        })
        started = time.perf_counter()
        checked = preflight(cfg)
        run_indicators(checked)
        wall = time.perf_counter() - started
        tracker = Tracker.from_config(cfg)
        key = stage_keys(cfg, (checked.dataset or prepare_dataset(cfg.data)).fingerprint).indicators
        run_id = tracker.find_finished_stage_run(cfg, "indicators", key)
        rates[workers] = tracker.client.get_run(run_id).data.metrics["images_per_second"]
        print(f"{workers} worker(s): {rates[workers]:.1f} images/s in the training loop (|B|+1 = "
              f"{len(cfg.indicators.bits) + 1} passes per image), stage wall time {wall:.0f} s")
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
