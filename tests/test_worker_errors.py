"""A UserError that can only happen inside a Ray worker (a corrupt checkpoint, say) still reaches the
user as one line with exit status 2, through Ray Train's and Ray Core's exception wrappers; any other
worker error keeps its traceback."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.cli import run_reporting_errors
from orchestrator.cli.run import check_cluster
from orchestrator.config.schema import PipelineConfig
from orchestrator.distributed.capacity import cluster_capacity
from orchestrator.common.errors import ConfigError, UserError

MESSAGE = "fp.pt: not a readable torch checkpoint (worker)"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The workers cannot import this test module: its functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # "local": never join another cluster started on this machine (ray start writes /tmp/ray/ray_current_cluster)
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _raises_user_error(config=None) -> None:
    raise UserError(MESSAGE)


def _raises_a_bug(config=None) -> None:
    raise KeyError("a bug in the worker")


def _reported_capacity() -> dict[str, float] | None:
    deadline = time.monotonic() + 60  # Ray's monitor reports a few seconds after the start
    while (capacity := cluster_capacity()) is None and time.monotonic() < deadline:
        time.sleep(1)
    return capacity


def test_a_fixed_local_cluster_offers_what_it_has() -> None:
    capacity = _reported_capacity()
    assert capacity is not None and capacity["CPU"] == 3.0


def test_run_refuses_workers_a_fixed_cluster_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """`limpq run` on a given cluster: 3 CPUs and no autoscaler hold 2 one-CPU workers and Ray Data, not 3."""
    assert _reported_capacity() is not None
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # "joined" (already connected)
    check_cluster(PipelineConfig.model_validate({"data": {"demo": True}, "ray": {"num_workers": 2}}))
    with pytest.raises(ConfigError, match=r"need 4 CPUs, but the cluster offers at most 3; lower ray.num_workers"):
        check_cluster(PipelineConfig.model_validate({"data": {"demo": True}, "ray": {"num_workers": 3}}))


def test_user_error_in_a_ray_task_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    task = ray.remote(num_cpus=0.1)(_raises_user_error)
    assert run_reporting_errors(lambda: ray.get(task.remote())) == 2
    assert capsys.readouterr().err == f"limpq: error: {MESSAGE}\n"


def _counts_attempts_then_raises(config) -> None:
    with open(config["attempts"], "a") as attempts:
        attempts.write("attempt\n")
    raise (UserError(MESSAGE) if config["user_error"] else RuntimeError("a lost node, say"))


def test_user_error_in_a_train_worker_ends_the_stage_at_once_as_one_line(tmp_path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With retries allowed, a worker's UserError is not retried (it would fail the same way); any
    other worker error is, up to max_failures, each time resuming the same run."""
    from orchestrator.distributed.train import fit_with_retries

    def trainer(user_error: bool, attempts: Path):
        return lambda: TorchTrainer(
            _counts_attempts_then_raises,
            train_loop_config={"attempts": str(attempts), "user_error": user_error},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"errors-{user_error}", storage_path=str(tmp_path),
                                 failure_config=FailureConfig(max_failures=0)))

    mistake = tmp_path / "mistake.txt"
    assert run_reporting_errors(lambda: fit_with_retries(trainer(True, mistake), 2, "test")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"limpq: error: {MESSAGE}" and "Traceback" not in err
    assert mistake.read_text().count("attempt") == 1
    fault = tmp_path / "fault.txt"
    with pytest.raises(Exception, match="a lost node"):
        fit_with_retries(trainer(False, fault), 1, "test")
    assert fault.read_text().count("attempt") == 2


def test_other_worker_errors_keep_their_traceback() -> None:
    task = ray.remote(num_cpus=0.1)(_raises_a_bug)
    with pytest.raises(KeyError, match="a bug in the worker") as error:
        run_reporting_errors(lambda: ray.get(task.remote()))
    assert "line" in str(error.value) and "in _raises_a_bug" in str(error.value)  # the worker's traceback
