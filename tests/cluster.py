"""Shared helpers for tests that start servers and Ray clusters on 127.0.0.1: free ports, the
environment that would point Ray or MLflow elsewhere, and a one-machine cluster from
cluster/local-up.sh that must leave no process behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from orchestrator.distributed.runtime import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Environment that would point Ray or MLflow at another cluster than the one a test starts.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
# Ray's memory monitor kills workers when the machine's memory is nearly full, whoever fills it: on a
# test machine shared with other jobs that would be their memory, so the test clusters run without it.
NO_MEMORY_MONITOR = {"RAY_memory_monitor_refresh_ms": "0"}


def free_port() -> int:
    return free_ports(1)[0]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def local_up(data_dir: Path, **settings: str) -> Iterator[dict[str, str]]:
    """cluster/local-up.sh with private ports and directories (plus `settings`, LIMPQ_* variables);
    yields its environment with the Ray address (RAY_ADDRESS_GCS), DASHBOARD_URL and MLFLOW_URL, and on
    exit checks that local-down.sh left none of the processes it started."""
    ray_temp_dir = tempfile.mkdtemp(prefix="lq", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard, mlflow, client, agent = free_ports(5)
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        LIMPQ_CLUSTER_DIR=str(data_dir), LIMPQ_RAY_TEMP_DIR=ray_temp_dir, LIMPQ_RAY_PORT=str(gcs),
        LIMPQ_DASHBOARD_PORT=str(dashboard), LIMPQ_MLFLOW_PORT=str(mlflow),
        LIMPQ_RAY_EXTRA_ARGS=f"--ray-client-server-port {client} --dashboard-agent-listen-port {agent}",
        RAY_AUTH_TOKEN_PATH=str(data_dir / "auth_token"),
        **NO_MEMORY_MONITOR,
        **settings,
    )
    pid_files = []
    try:
        up = subprocess.run([str(REPO / "cluster/local-up.sh")], env=env, capture_output=True, text=True, timeout=900,
                            check=False)
        pid_files = sorted(data_dir.glob("*.pid"))
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "RAY_ADDRESS_GCS": f"127.0.0.1:{gcs}", "DASHBOARD_URL": f"http://127.0.0.1:{dashboard}",
               "MLFLOW_URL": f"http://127.0.0.1:{mlflow}", "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "token")}
    finally:
        pgids = [int(path.read_text()) for path in pid_files if path.exists()]
        down = subprocess.run([str(REPO / "cluster/local-down.sh")], env=env, capture_output=True, text=True,
                              check=False, timeout=300)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not any(group_alive(pgid) for pgid in pgids), "processes started by local-up.sh survived local-down.sh"


@contextmanager
def driver_env(cluster_env: dict[str, str]) -> Iterator[None]:
    """This test process as a driver of that cluster: its token, none of another cluster's addresses."""
    with pytest.MonkeyPatch.context() as patch:
        for key in FOREIGN_ENV:
            patch.delenv(key, raising=False)
        patch.setenv("RAY_AUTH_MODE", cluster_env["RAY_AUTH_MODE"])
        patch.setenv("RAY_AUTH_TOKEN_PATH", cluster_env["RAY_AUTH_TOKEN_PATH"])
        ray.shutdown()
        try:
            yield
        finally:
            ray.shutdown()
