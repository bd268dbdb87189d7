"""A UserError that can only happen inside a Ray worker (a corrupt checkpoint, say) still reaches the
user as one line with exit status 2, through Ray Train's and Ray Core's exception wrappers; any other
worker error keeps its traceback."""

from __future__ import annotations

import sys
import tempfile
import time

import pytest
import ray
import ray.cloudpickle
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.cli import run_reporting_errors
from orchestrator.distributed.capacity import cluster_capacity
from orchestrator.errors import UserError

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


def _fit(loop) -> None:
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(
            loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, failure_config=FailureConfig(max_failures=0)),
        ).fit()


def _raises_user_error(config=None) -> None:
    raise UserError(MESSAGE)


def _raises_a_bug(config=None) -> None:
    raise KeyError("a bug in the worker")


def test_a_fixed_local_cluster_offers_what_it_has() -> None:
    deadline = time.monotonic() + 60  # Ray's monitor reports a few seconds after the start
    while (capacity := cluster_capacity()) is None and time.monotonic() < deadline:
        time.sleep(1)
    assert capacity is not None and capacity["CPU"] == 3.0


def test_user_error_in_a_ray_task_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    task = ray.remote(num_cpus=0.1)(_raises_user_error)
    assert run_reporting_errors(lambda: ray.get(task.remote())) == 2
    assert capsys.readouterr().err == f"limpq: error: {MESSAGE}\n"


@pytest.mark.slow  # one TorchTrainer run: about a minute on 2 busy cores
def test_user_error_in_a_train_worker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_reporting_errors(lambda: _fit(_raises_user_error)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"limpq: error: {MESSAGE}"
    assert "Traceback" not in err


def test_other_worker_errors_keep_their_traceback() -> None:
    task = ray.remote(num_cpus=0.1)(_raises_a_bug)
    with pytest.raises(KeyError, match="a bug in the worker") as error:
        run_reporting_errors(lambda: ray.get(task.remote()))
    assert "line" in str(error.value) and "in _raises_a_bug" in str(error.value)  # the worker's traceback
