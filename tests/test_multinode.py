"""Several Ray nodes on one machine, each its own raylet with its own CPUs, under a head that offers
none: the worker nodes cluster/local-up.sh starts, the nodes Ray's autoscaler adds on demand (its fake
multi-node provider, started by local-up.sh as well), and ray.cluster_utils.Cluster for the node-loss
test. The pipeline runs through its own entry points (run_pipeline, run_indicators) with
`ray.address` pointing at the cluster; what happened is read back from MLflow and Ray's state API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from pipelines import tiny_config
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from cluster import FOREIGN_ENV, NO_MEMORY_MONITOR, driver_env, free_ports, local_up
from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.run import run_indicators, run_pipeline
from orchestrator.checks.preflight import preflight

# What every multi-node test config changes from the tiny defaults.
MULTINODE = {"indicators": {"train_fraction": 0.5}, "finetune": {"epochs": 1, "train_fraction": 0.2},
             "ray": {"cpus_per_worker": 1, "max_failures": 2}}


def _tiny_config(tmp_path: Path, digits: Path, tracking_uri: str, **sections: dict) -> PipelineConfig:
    merged = {section: {**MULTINODE.get(section, {}), **sections.get(section, {})} for section in {*MULTINODE, *sections}}
    return tiny_config(tmp_path, digits, "multinode", mlflow={"tracking_uri": tracking_uri, "experiment": "multinode"},
                       **merged)


def _max_overlap(intervals: list[tuple[int, int]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t opens)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------ worker nodes

NODE_REPORT = """
import json, time, ray
ray.init()
@ray.remote(num_cpus=1)
def node_of_a_one_cpu_task():
    time.sleep(2)  # both tasks at once: one per 1-CPU node
    return ray.get_runtime_context().get_node_id()
head = ray.get_runtime_context().get_node_id()
print("NODES " + json.dumps({"head": head, "tasks": ray.get([node_of_a_one_cpu_task.remote() for _ in range(2)]),
                             "cpus": {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}}))
"""


def test_local_up_worker_nodes_take_the_work_and_a_job_is_accepted_at_once(tmp_path: Path) -> None:
    with local_up(tmp_path / "cluster", LIMPQ_WORKER_NODES="2", LIMPQ_WORKER_CPUS="1") as env:
        # Right after local-up.sh returns: no "No available agent to submit job".
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", env["DASHBOARD_URL"], "--", "python", "-c", NODE_REPORT],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        [line] = [line for line in submit.stdout.splitlines() if line.startswith("NODES ")]
        report = json.loads(line.removeprefix("NODES "))
        # The job's driver runs on the head, which offers no CPU: the tasks ran on the two worker nodes.
        assert report["cpus"] == {**{node: 1.0 for node in report["tasks"]}, report["head"]: 0}
        assert len(set(report["tasks"])) == 2 and report["head"] not in report["tasks"]


# ------------------------------------------------------------------------------ autoscaling sweep

@pytest.fixture(scope="module")
def autoscaled_sweep(tmp_path_factory: pytest.TempPathFactory, digits_slice: Path) -> Iterator[dict]:
    """The pipeline with 4 budgets of 1-CPU trials on a cluster that starts with no worker node and
    lets Ray's autoscaler add up to 3 nodes of 3 CPUs (a trial: 1 for its Train worker, 1 for its Ray
    Data tasks, a sliver for its Tune driver). Yields the config, MLflow client and nodes."""
    tmp_path = tmp_path_factory.mktemp("autoscaled")
    # Ray reads the auth mode once per process: this process drives the cluster, so the cluster takes
    # its mode (no token unless the environment asks for one).
    auth = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        auth["RAY_AUTH_TOKEN_PATH"] = os.environ["RAY_AUTH_TOKEN_PATH"]
    with local_up(tmp_path / "cluster", LIMPQ_AUTOSCALE_MAX_NODES="3", LIMPQ_WORKER_CPUS="3",
                  LIMPQ_IDLE_TIMEOUT_MIN="5", **auth) as env, driver_env(env):
        cfg = _tiny_config(
            tmp_path, digits_slice, env["MLFLOW_URL"],
            search={"budgets": [{"target_wbits": w, "target_abits": a} for w, a in ((2, 2), (3, 3), (4, 4), (3, 4))]},
            finetune={"epochs": 2},
            ray={"address": env["RAY_ADDRESS_GCS"]},
        )
        started = time.monotonic()
        rows = run_pipeline(preflight(cfg))
        seconds = time.monotonic() - started
        nodes = ray.nodes()
        yield {"cfg": cfg, "rows": rows, "nodes": nodes, "seconds": seconds,
               "client": MlflowClient(env["MLFLOW_URL"])}


def _trial_runs(sweep: dict) -> list:
    client = sweep["client"]
    experiment = client.get_experiment_by_name(sweep["cfg"].mlflow.experiment)
    return client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'trial'")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_autoscaled_sweep_runs_trials_at_once_on_added_nodes(autoscaled_sweep: dict) -> None:
    trials = _trial_runs(autoscaled_sweep)
    assert sorted(run.info.run_name for run in trials) == sorted(row["budget"] for row in autoscaled_sweep["rows"])
    assert all(run.info.status == "FINISHED" for run in trials), [(r.info.run_name, r.info.status) for r in trials]
    concurrency = _max_overlap([(run.info.start_time, run.info.end_time) for run in trials])
    # Every node Ray ever registered, alive or (removed when idle) dead, but the head.
    [head] = [node for node in autoscaled_sweep["nodes"] if "node:__internal_head__" in node["Resources"]]
    added = [node for node in autoscaled_sweep["nodes"] if node["NodeID"] != head["NodeID"]]
    print(f"\nautoscaled sweep: {len(trials)} trials, at most {concurrency} at once, {len(added)} worker nodes "
          f"added to a CPU-less head, pipeline {autoscaled_sweep['seconds']:.0f} s")
    assert head["Resources"].get("CPU", 0) == 0
    assert concurrency >= 2
    assert len(added) >= 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_without_asha_every_budget_reports_its_last_epoch(autoscaled_sweep: dict) -> None:
    epochs = autoscaled_sweep["cfg"].finetune.epochs
    client = autoscaled_sweep["client"]
    for run in _trial_runs(autoscaled_sweep):
        history = client.get_metric_history(run.info.run_id, "epoch")
        assert max(metric.value for metric in history) == epochs, run.info.run_name
        assert "val_top1" in run.data.metrics, run.info.run_name
    assert all(row["status"] == "ok" and row["top1"] is not None for row in autoscaled_sweep["rows"])


# ------------------------------------------------------------------------------ Train across nodes

@pytest.fixture
def three_worker_nodes() -> Iterator[Cluster]:
    """A CPU-less head and three 3-CPU worker nodes, each its own raylet (ray.cluster_utils)."""
    ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="lq", dir="/tmp")
    port, dashboard, agent = free_ports(3)
    with pytest.MonkeyPatch.context() as patch:
        for key in FOREIGN_ENV:
            patch.delenv(key, raising=False)
        patch.setenv("RAY_AUTH_MODE", "disabled")
        # Inherited by every Ray process: Ray's helpers that look the cluster up (Train's placement
        # group cleaner) find this one, not another on the machine.
        patch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        for key, value in NO_MEMORY_MONITOR.items():
            patch.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": port, "temp_dir": temp_dir, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "dashboard_agent_listen_port": agent,
        })
        try:
            for _ in range(3):
                cluster.add_node(num_cpus=3)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _registered_checkpoints(storage: Path) -> list:
    """Checkpoints Ray Train has registered (a resumed run starts from these): a checkpoint directory
    appears some time before, and a node lost in between makes the run start over."""
    for snapshot in storage.glob("*indicators*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []  # being written
    return []


def _train_workers() -> list:
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, raise_on_missing_output=False)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_indicator_workers_span_two_nodes_and_survive_losing_one(
    three_worker_nodes: Cluster, tmp_path: Path, digits_slice: Path
) -> None:
    # 2-CPU workers on 3-CPU nodes: no node holds both, so the group spans two; the third node is where
    # the group goes on when one of them is lost.
    cfg = _tiny_config(
        tmp_path, digits_slice, f"sqlite:///{tmp_path / 'mlflow.db'}",
        data={"batch_size": 8}, indicators={"epochs": 2, "train_fraction": 0.5},
        ray={"address": three_worker_nodes.address, "num_workers": 2, "cpus_per_worker": 2, "max_failures": 3},
    )
    client = MlflowClient(cfg.mlflow.tracking_uri)
    nodes = {node.node_id: node for node in three_worker_nodes.worker_nodes}
    seen: dict = {}

    def kill_a_worker_node_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and "killed" not in seen:
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("multinode")
            runs = client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'indicators'") \
                if experiment else []
            if not runs or not _registered_checkpoints(tmp_path / "ray") or \
                    not client.get_metric_history(runs[0].info.run_id, "epoch"):
                continue
            alive = [actor for actor in _train_workers() if actor.state == "ALIVE"]
            seen["placement"] = sorted(actor.node_id for actor in alive)
            victim = next(actor.node_id for actor in alive if actor.node_id in nodes)
            nodes[victim].kill_raylet()
            seen["killed"] = victim

    killer = threading.Thread(target=kill_a_worker_node_after_the_first_checkpoint, daemon=True)
    killer.start()
    started = time.monotonic()
    indicators = run_indicators(preflight(cfg, sweep=False))
    seconds = time.monotonic() - started
    killer.join(timeout=5)

    assert len(set(seen.get("placement", []))) == 2, f"workers not on two nodes: {seen}"
    assert "killed" in seen, "the node was not killed before training ended"
    assert json.loads(indicators.read_text())["bits"] == [4, 2]
    experiment = client.get_experiment_by_name("multinode")
    [run] = client.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'indicators'")
    assert run.info.status == "FINISHED"
    assert {artifact.path for artifact in client.list_artifacts(run.info.run_id)} >= {"indicators.json"}
    workers = _train_workers()
    # The group was restarted after the loss (more workers than one group's two), none on the lost node
    # among those that finished, and from the checkpoint: epoch 1 was not trained (and logged) again.
    assert len(workers) > 2
    epochs = [metric.step for metric in client.get_metric_history(run.info.run_id, "epoch")]
    print(f"\nindicator run across nodes: placement {seen['placement']}, killed {seen['killed']}, "
          f"{len(workers)} Train workers in all, epochs logged {epochs}, {seconds:.0f} s")
    assert sorted(epochs) == [1, 2]
