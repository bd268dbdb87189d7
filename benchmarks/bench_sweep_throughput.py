"""Sweep throughput: the same 8-budget sweep (ILP search + LSQ fine-tuning per budget, Ray Tune + Ray
Train) on a cluster of 1, 2 and 4 worker nodes, each its own raylet on this machine
(ray.cluster_utils.Cluster) under a head that offers no CPUs. Prints each sweep's wall time and,
last, the ratios to the 1-node time.

Simulated nodes share this machine's cores: the ratio shows how far Tune fans the trials out over the
nodes (scheduling, per-trial start-up overlapping); it reaches the node ratio only when the machine has
the cores to back every node.

    .venv/bin/python benchmarks/bench_sweep_throughput.py [--nodes 1 2 4] [--cpus-per-node 3] \\
        [--epochs 1] [--fraction 0.05] [--out runs/bench-sweep]

Each cluster runs the whole pipeline (`run_pipeline`, FP weights from a fresh init, one tiny indicator
epoch, then the sweep) into an MLflow experiment of its own; the time reported is the sweep's, from its
MLflow run's start and end. Each node gets --cpus-per-node logical CPUs; a trial's Train worker takes
one and its Ray Data tasks want one (the trial's Tune driver asks for memory only), so the sweep runs
one trial per node at a time (ray.max_concurrent_trials = nodes: on a cluster that cannot grow, more
trials than that would hold every CPU in Train workers and starve their own data tasks).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.run import run_pipeline
from orchestrator.distributed.runtime import free_ports
from orchestrator.common.errors import PipelineFailed
from orchestrator.checks.preflight import preflight

BUDGETS = [(2, 3), (3, 2), (3, 3), (2, 4), (4, 2), (3, 4), (4, 3), (4, 4)]  # 8 feasible (wbits, abits) targets


def config(out: Path, name: str, epochs: int, fraction: float, experiment: str, **ray_settings) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": name, "output_dir": str(out / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(out / "digits"), "demo": True, "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
        "fp": {"epochs": 0},
        "indicators": {"bits": [4, 3, 2], "epochs": 1, "train_fraction": fraction},
        "search": {"budgets": [{"target_wbits": w, "target_abits": a} for w, a in BUDGETS]},
        "finetune": {"epochs": epochs, "train_fraction": fraction, "baselines": []},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(out / "ray"), **ray_settings},
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": experiment},
    }).with_absolute_paths()


def sweep_seconds(out: Path, nodes: int, cpus_per_node: float, epochs: int, fraction: float) -> tuple[float, int]:
    """Wall time of the sweep on a fresh cluster of `nodes` worker nodes; also the failed-trial count."""
    temp_dir = tempfile.mkdtemp(prefix="lqb", dir="/tmp")  # Ray's socket paths must stay short
    port, dashboard, agent = free_ports(3)
    # Inherited by every Ray process, so Ray's helpers that look the cluster up find this one.
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": port, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "dashboard_agent_listen_port": agent,
    })
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node)
        # An experiment of its own: a finished sweep of the same settings elsewhere would be reused.
        cfg = config(out, f"sweep-{nodes}-nodes", epochs, fraction, f"bench-sweep-{nodes}-nodes-{int(time.time())}",
                     address=cluster.address, max_concurrent_trials=nodes)
        try:
            run_pipeline(preflight(cfg))
        except PipelineFailed:  # some trial failed: reported below, the time still counts
            pass
        client = MlflowClient(cfg.mlflow.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        [sweep] = client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'sweep'")
        trials = client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'trial'")
        failed = len(BUDGETS) - sum(run.info.status == "FINISHED" for run in trials)
        return (sweep.info.end_time - sweep.info.start_time) / 1000, failed
    finally:
        ray.shutdown()
        cluster.shutdown()
        del os.environ["RAY_ADDRESS"]
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cpus-per-node", type=float, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per trial")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of the digits train split per epoch")
    parser.add_argument("--out", default="runs/bench-sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(key, None)

    seconds = {}
    for nodes in args.nodes:
        seconds[nodes], failed = sweep_seconds(out, nodes, args.cpus_per_node, args.epochs, args.fraction)
        print(f"{nodes} node(s) x {args.cpus_per_node:g} CPUs: {len(BUDGETS)} budgets in {seconds[nodes]:.0f} s"
              f"{f' ({failed} failed)' if failed else ''}", flush=True)
    base = args.nodes[0]
    print("ratios (wall time of the sweep on " + f"{base} node(s) / on n nodes): " + ", ".join(
        f"{nodes} nodes {seconds[base] / seconds[nodes]:.2f}x" for nodes in args.nodes))


if __name__ == "__main__":
    main()
