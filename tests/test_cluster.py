"""The cluster path a user takes: launcher configs that `ray up` accepts, a one-machine cluster from
cluster/local-up.sh, jobs submitted with `ray job submit` and `limpq submit`, and their results in the
cluster's MLflow server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster import REPO, VENV_BIN, free_port, local_up
from orchestrator.cli import main
from orchestrator.config.loading import load_config
from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.submission import (
    DEFAULT_ADDRESS,
    load_runtime_env,
    resolve_address,
)
from orchestrator.common.errors import ConfigError, UserError

SMOKE_CONFIG = "jobs/configs/smoke.yaml"
JOB_TIMEOUT_S = 1500


# ------------------------------------------------------------------------------ launcher configs

def _launcher_config(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_launcher_config_passes_the_launchers_own_validation(path: str) -> None:
    # What `ray up` does before touching a machine: fill in the provider defaults, then check
    # the result against ray/autoscaler/ray-schema.json and the launcher's own rules.
    validate_config(prepare_config(_launcher_config(path)))


def test_launcher_validation_rejects_a_misspelt_key() -> None:
    config = _launcher_config("ray_cluster.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_launcher_config_keeps_dashboard_on_loopback_and_token_auth_on(path: str) -> None:
    config = _launcher_config(path)
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "mlflow server" in head and "MLFLOW_TRACKING_URI=" in head and "MLFLOW_TRACKING_URI=" in workers


def test_cloud_config_has_a_cpu_head_and_autoscaled_gpu_workers() -> None:
    config = prepare_config(_launcher_config("ray_cluster.yaml"))
    gpu = config["available_node_types"]["gpu_worker"]
    assert config["provider"]["type"] == "aws"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["node_config"]["InstanceType"].startswith(("m", "c"))


def test_cloud_head_runs_no_training_and_storage_is_in_the_bucket() -> None:
    config = _launcher_config("ray_cluster.yaml")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    text = (REPO / "ray_cluster.yaml").read_text()
    for key, uri in (("data.path", "s3://BUCKET/"), ("ray.storage_path", "s3://BUCKET/"), ("MLflow artifacts", "s3://BUCKET/")):
        assert any(line.lstrip("# ").startswith(key) and uri in line for line in text.splitlines()), key


# ------------------------------------------------------------------------------ KubeRay

# What the RayJob CRD of KubeRay v1.7.0 (ray-operator/config/crd/bases/ray.io_rayjobs.yaml, version v1)
# requires, and the fields it knows at the levels this manifest writes: the API server prunes unknown
# fields silently, so a misspelt key would just vanish.
RAYJOB_REQUIRED = {
    "spec.rayClusterSpec": ["headGroupSpec"],
    "spec.rayClusterSpec.headGroupSpec": ["template"],
    "spec.rayClusterSpec.headGroupSpec.template.spec": ["containers"],
    "spec.rayClusterSpec.workerGroupSpecs[]": ["groupName", "maxReplicas", "minReplicas", "template"],
    "spec.rayClusterSpec.workerGroupSpecs[].template.spec": ["containers"],
}
RAYJOB_FIELDS = {
    "spec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
             "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
             "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
             "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "spec.rayClusterSpec": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                            "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
                            "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy",
                            "workerGroupSpecs"},
    "spec.rayClusterSpec.headGroupSpec": {"enableIngress", "headService", "ingressOptions", "labels",
                                          "rayStartParams", "resources", "serviceType", "template"},
    "spec.rayClusterSpec.workerGroupSpecs[]": {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas",
                                               "minReplicas", "numOfHosts", "priority", "rayStartParams", "replicas",
                                               "resources", "scaleStrategy", "suspend", "template"},
    "spec.rayClusterSpec.autoscalerOptions": {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image",
                                              "imagePullPolicy", "resources", "securityContext", "upscalingMode",
                                              "version", "volumeMounts"},
    "spec.rayClusterSpec.authOptions": {"enableK8sTokenAuth", "mode", "secretName"},
}


def _at(document: dict, path: str) -> list[Any]:
    """The values at a dotted path; `name[]` steps into every item of a list."""
    values = [document]
    for step in path.split("."):
        values = [value[step.removesuffix("[]")] for value in values]
        if step.endswith("[]"):
            values = [item for value in values for item in value]
    return values


def _kuberay_documents() -> tuple[dict, dict]:
    documents = list(yaml.safe_load_all((REPO / "cluster/kuberay-rayjob.yaml").read_text()))
    [config_map] = [d for d in documents if d["kind"] == "ConfigMap"]
    [rayjob] = [d for d in documents if d["kind"] == "RayJob"]
    return config_map, rayjob


def test_kuberay_rayjob_has_the_crds_required_fields_and_no_unknown_ones() -> None:
    _, rayjob = _kuberay_documents()
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["metadata"]["name"]
    for path, required in RAYJOB_REQUIRED.items():
        for value in _at(rayjob, path):
            assert set(required) <= set(value), f"{path} lacks {set(required) - set(value)}"
    for path, known in RAYJOB_FIELDS.items():
        for value in _at(rayjob, path):
            assert set(value) <= known, f"{path}: fields the CRD does not know: {set(value) - known}"
    for container in _at(rayjob, "spec.rayClusterSpec.headGroupSpec.template.spec.containers[]") + _at(
            rayjob, "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers[]"):
        assert container["name"] and container["image"]
    for params in _at(rayjob, "spec.rayClusterSpec.headGroupSpec.rayStartParams") + _at(
            rayjob, "spec.rayClusterSpec.workerGroupSpecs[].rayStartParams"):
        assert all(isinstance(value, str) for value in params.values()), "rayStartParams values are strings"
    for group in _at(rayjob, "spec.rayClusterSpec.workerGroupSpecs[]"):
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] in ("disabled", "token")
    assert isinstance(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]), dict)


def test_kuberay_rayjob_keeps_the_head_free_autoscales_and_reads_the_bucket(tmp_path: Path) -> None:
    config_map, rayjob = _kuberay_documents()
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == ray.__version__
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    pipeline = yaml.safe_load(config_map["data"]["pipeline.yaml"])
    assert pipeline["data"]["path"].startswith("s3://") and pipeline["ray"]["storage_path"].startswith("s3://")
    # The entrypoint reads the mounted config; every other setting must pass the schema.
    assert rayjob["spec"]["entrypoint"].split()[-1] == "/config/pipeline.yaml"
    PipelineConfig.model_validate({**pipeline, "data": {**pipeline["data"], "path": str(tmp_path)}})


# ------------------------------------------------------------------------------ runtime env, submit

def test_runtime_env_file_uploads_the_repository_without_local_state() -> None:
    runtime_env = load_runtime_env(REPO / "cluster/runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {".venv/", ".git/", "runs/", "demo_data/", "mlflow.db", "mlartifacts/"} <= set(runtime_env["excludes"])
    # The cluster's own MLflow address comes from its Ray processes; a fixed one here would win.
    assert "MLFLOW_TRACKING_URI" not in runtime_env.get("env_vars", {})


def test_working_dir_option_overrides_the_runtime_env_file() -> None:
    assert load_runtime_env(REPO / "cluster/runtime_env.yaml", "other")["working_dir"] == "other"
    assert load_runtime_env(None)["working_dir"] == "."


def test_submission_carries_the_git_commit_the_upload_lacks() -> None:
    env_vars = load_runtime_env(None, str(REPO)).get("env_vars", {})
    if (REPO / ".git").exists():
        assert len(env_vars["LIMPQ_GIT_COMMIT"]) == 40


@pytest.mark.parametrize("text, problem", [("- a\n- b\n", "must be a mapping"), ("a: [b\n", "not valid YAML")])
def test_bad_runtime_env_file_is_a_one_line_user_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=problem):
        load_runtime_env(path)
    with pytest.raises(UserError, match="not found"):
        load_runtime_env(tmp_path / "missing.yaml")


def test_submit_address_follows_rays_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-address:8265")
    assert resolve_address(None) == "http://ray-address:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api-server:8265")
    assert resolve_address(None) == "http://api-server:8265"
    assert resolve_address("http://explicit:8265") == "http://explicit:8265"


def test_submit_without_a_command_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--"]) == 2
    assert "limpq: error: submit: no command given" in capsys.readouterr().err


def test_submit_to_an_unreachable_cluster_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # submit() points RAY_API_SERVER_ADDRESS at its address; an explicit auth mode keeps Ray's
    # process-wide auth setting as it is. monkeypatch restores both.
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unused")
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    port = free_port()
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "echo", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"limpq: error: cannot use the Ray job API at http://127.0.0.1:{port}") and err.count("\n") == 1


# ------------------------------------------------------------------------------ end to end

def _non_loopback_address() -> str | None:
    """This machine's primary address (a UDP connect sends nothing), or None without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@dataclass
class Cluster:
    data_dir: Path
    dashboard_url: str
    mlflow_url: str
    dashboard_port: int
    mlflow_port: int
    env: dict[str, str]
    token_file: Path

    def run(self, command: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A shell command from the repository root, after `source env.sh` as the user does."""
        return subprocess.run(
            ["bash", "-c", f"source '{self.data_dir}/env.sh' && {command}"],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def job_api(self, path: str) -> Any:
        """GET on Ray's job REST API, authenticated with the cluster's token."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def mlflow(self, endpoint: str, params: dict | None = None, body: dict | None = None) -> dict:
        url = f"{self.mlflow_url}/api/2.0/mlflow/{endpoint}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def _run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "cluster" / name)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cluster")
    with local_up(data_dir) as env:
        dashboard, mlflow = env["DASHBOARD_URL"], env["MLFLOW_URL"]
        yield Cluster(data_dir, dashboard, mlflow, int(dashboard.rsplit(":", 1)[1]), int(mlflow.rsplit(":", 1)[1]),
                      env, data_dir / "auth_token")


@pytest.mark.slow
def test_local_cluster_is_idempotent_loopback_only_and_authenticated(local_cluster: Cluster) -> None:
    pids = {name: (local_cluster.data_dir / name).read_text() for name in ("ray.pid", "mlflow.pid")}
    again = _run_script("local-up.sh", local_cluster.env)
    assert again.returncode == 0, again.stderr
    assert "Ray already running" in again.stdout and "MLflow already running" in again.stdout
    assert pids == {name: (local_cluster.data_dir / name).read_text() for name in pids}
    assert local_cluster.token_file.stat().st_mode & 0o077 == 0

    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        urllib.request.urlopen(f"{local_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert unauthenticated.value.code == 401
    assert isinstance(local_cluster.job_api("/api/jobs/"), list)

    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine to check the bind address against")
    for port in (local_cluster.dashboard_port, local_cluster.mlflow_port):
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=3).close()


def _artifact_files(cluster: Cluster, run_id: str, path: str = "") -> list[str]:
    listing = cluster.mlflow("artifacts/list", {"run_id": run_id, **({"path": path} if path else {})})
    files = []
    for entry in listing.get("files", []):
        if entry["is_dir"]:
            files += _artifact_files(cluster, run_id, entry["path"])
        else:
            files.append(entry["path"])
    return files


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_pipeline_job_runs_on_the_cluster_and_logs_to_its_mlflow_server(local_cluster: Cluster) -> None:
    job_id = f"limpq-test-{uuid.uuid4().hex[:8]}"
    submit = local_cluster.run(
        f"ray job submit --submission-id {job_id} --runtime-env cluster/runtime_env.yaml "
        f"-- python jobs/pipeline.py --config {SMOKE_CONFIG}"
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert local_cluster.job_api(f"/api/jobs/{job_id}")["status"] == "SUCCEEDED"

    smoke = yaml.safe_load((REPO / SMOKE_CONFIG).read_text())
    experiment = local_cluster.mlflow("experiments/get-by-name", {"experiment_name": smoke["mlflow"]["experiment"]})
    runs = local_cluster.mlflow(
        "runs/search", body={"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 1000}
    ).get("runs", [])
    tags = {run["info"]["run_id"]: {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])} for run in runs}
    status = {run["info"]["run_id"]: run["info"]["status"] for run in runs}
    stages = {run_tags.get("limpq.stage"): status[run_id] for run_id, run_tags in tags.items()}
    assert stages.get("fp") == stages.get("indicators") == "FINISHED", stages
    parents = {run_tags["mlflow.parentRunId"] for run_tags in tags.values() if "mlflow.parentRunId" in run_tags}
    assert len(parents) == 1, f"expected one sweep parent run, found {sorted(parents)}"
    (parent,) = parents
    trials = [run_id for run_id, run_tags in tags.items() if run_tags.get("mlflow.parentRunId") == parent]
    expected_trials = len(smoke["search"]["budgets"]) + len(smoke["finetune"]["baselines"])
    assert len(trials) >= expected_trials
    assert all(status[run_id] == "FINISHED" for run_id in [parent, *trials]), status

    parent_files = _artifact_files(local_cluster, parent)
    assert any(name.endswith(".png") for name in parent_files) and any(name.endswith(".csv") for name in parent_files)
    for trial in trials:
        assert any(name.endswith(".json") for name in _artifact_files(local_cluster, trial)), trial
    # The server proxies artifacts into the cluster's data directory.
    assert any((local_cluster.data_dir / "mlartifacts").rglob("*.png"))


def _bad_config(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "bad.yaml"
    path.write_text("data: {demo: true}\nray: {num_workers: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    return path, f"limpq: error: {error.value}"


@pytest.mark.slow
def test_job_with_a_bad_config_fails_with_the_one_line_message(local_cluster: Cluster, tmp_path: Path) -> None:
    config, message = _bad_config(tmp_path)
    job_id = f"limpq-test-{uuid.uuid4().hex[:8]}"
    submit = local_cluster.run(
        f"ray job submit --submission-id {job_id} --runtime-env cluster/runtime_env.yaml "
        f"-- python jobs/pipeline.py --config {config}", timeout=300,
    )
    assert submit.returncode == 1, submit.stdout + submit.stderr
    assert local_cluster.job_api(f"/api/jobs/{job_id}")["status"] == "FAILED"
    logs = local_cluster.job_api(f"/api/jobs/{job_id}/logs")["logs"]
    assert message in logs.splitlines()
    assert "Traceback" not in logs


@pytest.mark.slow
def test_limpq_submit_follows_the_job_and_returns_its_status(local_cluster: Cluster, tmp_path: Path) -> None:
    limpq = VENV_BIN / "limpq"
    ok = local_cluster.run(f"{limpq} submit -- python -c 'print(\"hello from the cluster\")'", timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "submitted job" in ok.stdout and "hello from the cluster" in ok.stdout and "SUCCEEDED" in ok.stdout

    config, message = _bad_config(tmp_path)
    # An explicit --address and no RAY_AUTH_MODE: limpq finds the token by itself.
    failed = subprocess.run(
        [str(limpq), "submit", "--address", local_cluster.dashboard_url, "--runtime-env", "cluster/runtime_env.yaml",
         "--", "python", "jobs/pipeline.py", "--config", str(config)],
        cwd=REPO, env=local_cluster.env, capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert message in failed.stdout.splitlines()
    assert "FAILED" in failed.stderr


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_a_users_own_model_travels_with_the_job(local_cluster: Cluster, tmp_path: Path) -> None:
    """`model.arch: package:callable` with the package in the job's `py_modules`: the driver's preflight,
    the Ray Train workers and the Tune trials all import it on the cluster."""
    from test_any_model import USER_MODULE

    package = tmp_path / "limpq_cluster_usernet"
    package.mkdir()
    (package / "__init__.py").write_text(USER_MODULE)
    runtime_env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    runtime_env["py_modules"] = [str(package)]
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    raw = yaml.safe_load((REPO / SMOKE_CONFIG).read_text())
    raw["model"].update(arch="limpq_cluster_usernet:build", input_size=16)
    raw["name"] = f"usernet-{uuid.uuid4().hex[:6]}"
    raw["finetune"].update(epochs=0, baselines=[])
    raw["search"]["budgets"] = raw["search"]["budgets"][:1]
    config = tmp_path / "usernet.yaml"
    config.write_text(yaml.safe_dump(raw))
    job_id = f"limpq-test-{uuid.uuid4().hex[:8]}"
    submit = local_cluster.run(f"ray job submit --submission-id {job_id} --runtime-env {tmp_path / 'runtime_env.yaml'} "
                               f"-- python jobs/pipeline.py --config {config}")
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert local_cluster.job_api(f"/api/jobs/{job_id}")["status"] == "SUCCEEDED"
    assert "limpq_cluster_usernet.build" in submit.stdout  # the registered model's name in the final report
