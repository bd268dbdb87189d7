"""Datasets and Ray storage on object storage: a real S3-compatible server (moto) on 127.0.0.1,
reached through the standard AWS variables, with real Ray Data and Ray Train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from data_fixtures import checked_index, data_config, ray_datasets_of, write_tiny_folder

from orchestrator.cli import main as limpq
from orchestrator.config.schema import PipelineConfig
from orchestrator.data.storage import check_storage_uri
from orchestrator.distributed.datasets import SkipCounter, iter_batches
from orchestrator.common.errors import UserError


@pytest.fixture(scope="module")
def local_ray(s3_env):
    """Started after the AWS variables are set, so Ray's workers inherit them."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3-data") / "folder"
    write_tiny_folder(root, classes=3, per_class=8)
    return root


def upload(local: Path, uri: str) -> None:
    destination, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=destination)


def epoch_labels(dataset) -> Counter:
    return Counter(label for _, labels in iter_batches(dataset, 8, device="cpu") for label in labels.tolist())


def s3_config(uri: str, fmt: str = "folder", **sections) -> PipelineConfig:
    return PipelineConfig.model_validate({"data": {"path": uri, "format": fmt},
                                          "model": {"num_classes": 10, "input_size": 16}, **sections})


def test_folder_and_parquet_on_s3_read_through_ray_data(local_ray, s3_bucket, local_folder, capsys):
    folder_uri, parquet_uri = f"s3://{s3_bucket}/digits/folder", f"s3://{s3_bucket}/digits/parquet"
    upload(local_folder, folder_uri)
    assert limpq(["data", "to-parquet", str(local_folder), parquet_uri, "--shard-size", "10", "--workers", "1"]) == 0
    assert "train: 24 images in 3 shard(s)" in capsys.readouterr().out
    local = ray_datasets_of(data_config(local_folder), SkipCounter())
    expected = {split: epoch_labels(ds) for split, ds in local.items()}
    for uri, fmt in ((folder_uri, "folder"), (parquet_uri, "parquet")):
        cfg = s3_config(uri, fmt)
        assert checked_index(cfg).source == uri
        datasets = ray_datasets_of(cfg, SkipCounter())
        assert {split: epoch_labels(ds) for split, ds in datasets.items()} == expected, fmt
    # Content identity, not location: the copy in the bucket fingerprints like the local folder.
    assert checked_index(s3_config(folder_uri)).fingerprint == checked_index(data_config(local_folder)).fingerprint
    # to-parquet from a bucket, too, and never over existing shards.
    assert limpq(["data", "to-parquet", folder_uri, f"s3://{s3_bucket}/again", "--workers", "1"]) == 0
    assert limpq(["data", "to-parquet", folder_uri, parquet_uri]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_ray_train_checkpoints_to_s3_storage_path(local_ray, s3_env, s3_bucket):
    import ray.train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config):
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "state.json").write_text(json.dumps({"step": 1}))
            ray.train.report({"loss": 0.5}, checkpoint=Checkpoint.from_directory(directory))

    storage = f"s3://{s3_bucket}/ray-results"
    check_storage_uri(storage)
    result = TorchTrainer(train_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name="s3-run", storage_path=storage)).fit()
    assert result.checkpoint.path.startswith(f"{s3_bucket}/ray-results/s3-run/")
    keys = [item["Key"] for item in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert f"{result.checkpoint.path.split('/', 1)[1]}/state.json" in keys


def test_missing_bucket_and_wrong_credentials_are_one_line(s3_env, s3_bucket, local_folder, monkeypatch, capsys):
    upload(local_folder, f"s3://{s3_bucket}/folder")
    with pytest.raises(UserError, match=r"^data.path: bucket 'no-such-bucket' does not exist") as caught:
        checked_index(s3_config("s3://no-such-bucket/folder"))
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=r"^data.path: dataset path does not exist: s3://"):
        checked_index(s3_config(f"s3://{s3_bucket}/nowhere"))
    with pytest.raises(UserError, match=r"^ray.storage_path: bucket 'no-such-bucket' does not exist"):
        check_storage_uri("s3://no-such-bucket/ray")
    assert limpq(["data", "to-parquet", str(local_folder), "s3://no-such-bucket/pq"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    for check, key in ((lambda: checked_index(s3_config(f"s3://{s3_bucket}/folder")), "data.path"),
                       (lambda: check_storage_uri(f"s3://{s3_bucket}/ray"), "ray.storage_path")):
        with pytest.raises(UserError, match=rf"^{key}: access denied to s3://{s3_bucket}.*AWS_SECRET_ACCESS_KEY") as caught:
            check()
        assert "\n" not in str(caught.value) and "wrong-secret" not in str(caught.value)


@pytest.mark.timeout(2400)
def test_smoke_pipeline_with_data_and_ray_storage_on_s3(s3_env, s3_bucket, digits_slice, tmp_path, capsys):
    """The pipeline end to end with `data.path` and `ray.storage_path` in a bucket of a real S3 server
    (credentials and endpoint from the standard AWS variables); a missing storage bucket is one line."""
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    client = s3_env.client()
    for path in digits_slice.rglob("*.png"):
        client.upload_file(str(path), s3_bucket, f"digits/{path.relative_to(digits_slice).as_posix()}")
    raw = {
        "name": "on-s3", "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": f"s3://{s3_bucket}/digits", "batch_size": 16, "min_crop_scale": 0.6, "hflip": False},
        "fp": {"epochs": 0},
        "indicators": {"bits": [4, 2], "epochs": 1, "train_fraction": 1.0},
        "search": {"budgets": [{"target_wbits": 4, "target_abits": 2}]},
        "finetune": {"epochs": 0},
        "ray": {"storage_path": f"s3://{s3_bucket}/ray"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "on-s3"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    ray.shutdown()  # the pipeline starts its own local Ray, which inherits the AWS variables
    missing = tmp_path / "missing-bucket.yaml"
    missing.write_text(yaml.safe_dump({**raw, "ray": {"storage_path": "s3://no-such-bucket-here/ray"}}))

    assert main(["run", "--config", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "limpq: error: ray.storage_path: bucket 'no-such-bucket-here' does not exist (s3://no-such-bucket-here/ray); "
        "create it or fix the URI"]

    try:
        assert main(["run", "--config", str(config)]) == 0
    finally:
        ray.shutdown()
    stored = {item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="ray/")["Contents"]}
    assert any(key.startswith("ray/on-s3-indicators-") for key in stored), sorted(stored)[:5]
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("on-s3")
    [sweep] = mlflow.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'sweep'")
    assert sweep.info.status == "FINISHED"
    [indicators] = mlflow.search_runs([experiment.experiment_id], "tags.`limpq.stage` = 'indicators'")
    sources = [item.dataset.source for item in indicators.inputs.dataset_inputs]
    assert sources and all(f"s3://{s3_bucket}/digits" in source for source in sources)
