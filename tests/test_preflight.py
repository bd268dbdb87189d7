"""Every config mistake knowable before training: one line naming the key and the fix, exit status 2,
no traceback, and neither Ray nor an MLflow run started (issue 9.4)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml

from orchestrator.cli import main
from orchestrator.config.loading import load_config, parse_overrides
from orchestrator.common.errors import ConfigError
from orchestrator.models.info import build_model
from orchestrator.checks.preflight import check_cluster_resources, preflight
from orchestrator.train.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
LEFT_BY_A_RUN = ("mlflow.db", "mlruns", "mlartifacts", "runs", "demo_data")  # relative to the working directory


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: a run that got as far as MLflow would leave mlflow.db or runs/ here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _base(data: Path) -> dict:
    """A config that passes preflight: the digits slice (80 train images, 10 classes) at 16 px."""
    return {
        "name": "preflight", "output_dir": "runs",
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(data), "batch_size": 8, "hflip": False},
        "fp": {"epochs": 1, "train_fraction": 0.5},
        "indicators": {"bits": [4, 3, 2], "epochs": 1, "train_fraction": 0.5},
        "search": {"budgets": [{"target_wbits": 3, "target_abits": 3}]},
        "finetune": {"epochs": 1, "train_fraction": 0.5, "baselines": [3]},
        "ray": {"num_workers": 2, "cpus_per_worker": 1},
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _edit(raw: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


def _assert_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], workdir: Path, expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("limpq: error: "), captured.err
    assert expected in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not ray.is_initialized()
    assert [name for name in LEFT_BY_A_RUN if (workdir / name).exists()] == []
    return captured.err


def test_a_good_config_passes_without_ray_or_mlflow(workdir: Path, digits_slice: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(workdir / "good.yaml", _base(digits_slice))
    assert main(["config", "validate", str(config)]) == 0
    assert "OK" in capsys.readouterr().out
    assert not ray.is_initialized() and [p.name for p in workdir.iterdir()] == ["good.yaml"]


# key -> value, and a fragment of the one-line message
BAD_VALUES = [
    ("model.arch", "resnet81", "model.arch: 'resnet81' is not a torchvision classification model; did you mean resnet18"),
    ("model.fixed_layers", ["conv1", "fc1"], "model.fixed_layers: 'fc1' is not a Conv2d/Linear of resnet18; did you mean fc?"),
    ("model.input_size", 8, None),  # resnet18 runs at 8 px: not an error (control)
    ("finetune.baselines", [3, 6], "finetune.baselines: 6 not in indicators.bits (4, 3, 2)"),
    ("search.wbits", [8, 4], "search.wbits: 8 not in indicators.bits (4, 3, 2)"),
    ("indicators.epochs", 0, "indicators.epochs: Input should be greater than or equal to 1"),
    ("finetune.epochs", 0, None),  # allowed: the sweep scores policies with the joint model (issue 12)
    ("finetune.nesterov", True, None),  # momentum 0.9 by default: fine (control)
    ("ray.use_gpu", True, None),  # gpus_per_worker 0 is added below
    ("data.batch_size", 32, "data.batch_size: 32 is more than a worker's share of the fp training set"),
    ("search.latency_table", "missing.csv", "search.latency_table: missing.csv: latency table not found"),
    ("search.budgets", [{"latency_ms": 5}], "search.budgets[0].latency_ms: a latency budget needs search.latency_table"),
    ("search.budgets", [{"name": "W3/A3", "bitops_g": 1}], "search.budgets[0].name: name 'W3/A3' may only hold"),
    ("search.budgets", [{"target_wbits": 3, "target_abits": 3}, {"bitops_g": 1, "name": "W3A3"}],
     "search.budgets[1]: label 'W3A3' repeats search.budgets[0]"),
    ("name", "my/run", "name: 'my/run' may only hold letters"),
    ("data.path", "nowhere", "data.path: dataset path does not exist: "),
    ("model.num_classes", 5, "has labels 0..9 but model.num_classes is 5; set model.num_classes: 10"),
    ("fp.source", "checkpoint", "fp.checkpoint: missing.pt: torch checkpoint not found"),
    ("fp.source", "torchvision", "fp.weights: 'ResNet50_Weights.IMAGENET1K_V1' are not weights of resnet18"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_each_bad_value_is_one_line_before_ray(key: str, value, message: str | None, workdir: Path,
                                               digits_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _edit(_base(digits_slice), key, value)
    if key == "ray.use_gpu":
        raw["ray"]["gpus_per_worker"] = 0
        message = "ray.gpus_per_worker: 0 with ray.use_gpu: true"
    if value == "checkpoint":
        raw["fp"]["checkpoint"] = "missing.pt"
    if value == "torchvision":
        raw["fp"]["weights"] = "ResNet50_Weights.IMAGENET1K_V1"
    config = _write(workdir / "bad.yaml", raw)
    if message is None:
        preflight(load_config(config))
        return
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_without_cuda_or_cluster(workdir: Path, digits_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(workdir / "gpu.yaml", _edit(_base(digits_slice), "ray.use_gpu", True))
    _assert_one_line_exit_2(["indicators", "train", "--config", str(config)], capsys, workdir,
                            "ray.use_gpu: true, but this machine has no CUDA device and no cluster is given")


def test_empty_class_and_unknown_val_class(workdir: Path, digits_slice: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = workdir / "data"
    shutil.copytree(digits_slice, data)
    (data / "train" / "7b").mkdir()
    config = _write(workdir / "bad.yaml", _edit(_base(data), "model.num_classes", 11))
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir,
                            f"data.path: class directory {data / 'train' / '7b'} holds no image files")
    (data / "train" / "7b").rmdir()
    (data / "val" / "x").mkdir()
    shutil.copy(next((data / "val" / "0").iterdir()), data / "val" / "x" / "a.png")
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, "x: class not present in the train split")


def test_corrupt_and_mismatched_fp_checkpoints(workdir: Path, digits_slice: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = workdir / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    raw = _edit(_base(digits_slice), "fp.source", "checkpoint")
    raw["fp"]["checkpoint"] = str(corrupt)
    config = _write(workdir / "bad.yaml", raw)
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, "corrupt.pt: not a readable torch checkpoint")
    corrupt.unlink()
    other = save_checkpoint(workdir / "r18-4.pt", build_model("resnet18", 4), meta={"arch": "resnet18"})
    raw["fp"]["checkpoint"] = str(other)
    _write(config, raw)
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, "r18-4.pt: checkpoint does not match the model")
    other.unlink()


def test_latency_table_must_cover_the_search(workdir: Path, digits_slice: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    table = workdir / "latency.csv"
    table.write_text("layer,wbits,abits,ms\nlayer1.0.conv1,3,3,0.1\nlayer9.conv,3,3,0.1\n")
    raw = _edit(_base(digits_slice), "search.latency_table", str(table))
    config = _write(workdir / "bad.yaml", raw)
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, "names layers resnet18 does not have: layer9.conv")
    table.write_text("layer,wbits,abits,ms\nlayer1.0.conv1,3,3,0.1\n")
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, "lacks 170 (layer, wbits, abits) entries")
    table.unlink()


@pytest.mark.parametrize("text, message", [
    ("name: a\nfp:\n  epochs: 1\nindicators: {epochs: 1}\nfp:\n  lr: 0.1\n",
     "line 5: duplicate key 'fp' (first at line 2); merge the two into one"),
    ("model:\n  arch: resnet18\n  arch: resnet34\n", "line 3: duplicate key 'arch' (first at line 2)"),
    ("name: [a\n", "line 2: not valid YAML"),
    ("- a\n", "top level must be a mapping"),
], ids=["duplicate-section", "duplicate-key", "bad-yaml", "not-a-mapping"])
def test_yaml_mistakes(text: str, message: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = workdir / "bad.yaml"
    config.write_text(text)
    err = _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, message)
    assert str(config) in err


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text("data: {demo: true}\nfp: &recipe {epochs: 1, lr: 0.2}\nfinetune:\n  <<: *recipe\n  epochs: 3\n")
    cfg = load_config(config)
    assert (cfg.finetune.epochs, cfg.finetune.lr) == (3, 0.2)


def test_non_utf8_config(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = workdir / "latin1.yaml"
    config.write_bytes("name: demo\n# caf\u00e9\n".encode("latin-1"))
    _assert_one_line_exit_2(["config", "validate", str(config)], capsys, workdir,
                            f"{config}: line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8")


@pytest.mark.parametrize("override, message", [
    ("seed.x=1", "--set seed.x: seed is a value, not a section; set it whole: --set seed=VALUE"),
    ("name=[a", "--set 'name=[a': line 1: not valid YAML"),
    ("indicators.epochs", "--set 'indicators.epochs': expected KEY=VALUE"),
    ("=3", "--set '=3': expected KEY=VALUE"),
    ("search.budgets.3.name=x", "--set search.budgets.3.name: search.budgets has 1 item(s)"),
    ("model.arch.depth=3", "--set model.arch.depth: model.arch is a value, not a section"),
    ("seed=abc", "limpq: error: --set: seed: Input should be a valid integer"),
    ("ray.num_workers=0", "limpq: error: --set: ray.num_workers: Input should be greater than or equal to 1"),
    ("ray.bf16=true", "limpq: error: --set: ray.bf16: moved to training.bf16; set training.bf16 instead\n"),
])
def test_malformed_set(override: str, message: str, workdir: Path, digits_slice: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(workdir / "good.yaml", _base(digits_slice))
    _assert_one_line_exit_2(["run", "--config", str(config), "--set", override], capsys, workdir, message)


def test_set_reaches_list_items(tmp_path: Path, digits_slice: Path) -> None:
    config = _write(tmp_path / "good.yaml", _base(digits_slice))
    cfg = load_config(config, parse_overrides(["search.budgets.0.name=w3", "ray.num_workers=1", "name='a b'"]))
    assert cfg.search.budgets[0].label() == "w3" and cfg.ray.num_workers == 1 and cfg.name == "a b"


def test_cluster_resources_rule(tmp_path: Path, digits_slice: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(_write(tmp_path / "cluster.yaml", _base(digits_slice)),
                      parse_overrides(["ray.use_gpu=true", "ray.gpus_per_worker=1"]))
    check_cluster_resources(cfg, {"CPU": 3, "GPU": 2})  # 2 workers x 1 CPU + 1 for Ray Data
    with pytest.raises(ConfigError, match=r"need 3 CPUs, but the cluster offers at most 2; lower ray.num_workers"):
        check_cluster_resources(cfg, {"CPU": 2, "GPU": 2})
    with pytest.raises(ConfigError, match=r"ray.use_gpu: 2 workers x ray.gpus_per_worker 1 need 2 GPUs, but the cluster "
                                          r"offers at most 1"):
        check_cluster_resources(cfg, {"CPU": 8, "GPU": 1})
    # Through preflight: a cluster (RAY_ADDRESS) without GPUs now and no autoscaler to add them,
    # refused before its address is probed.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(ConfigError, match="offers at most 0"):
            preflight(cfg, cluster_resources={"CPU": 64})


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    """The installed `limpq` entry point, as a user runs it."""
    config = tmp_path / "bad.yaml"
    config.write_text("data: {demo: true}\nmodel: {arch: resnet81}\n")
    limpq = Path(sys.executable).with_name("limpq")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([str(limpq), "run", "--config", str(config), "--set", "indicators.epochs=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "limpq: error: model.arch: 'resnet81' is not a torchvision classification model; " \
                            "did you mean resnet18 or resnet152 or resnet101?\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_parquet_dataset_without_shards(workdir: Path, digits_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "val"):
        (workdir / "pq" / split).mkdir(parents=True)
    raw = _edit(_base(workdir / "pq"), "data.format", "parquet")
    config = _write(workdir / "bad.yaml", raw)
    _assert_one_line_exit_2(["run", "--config", str(config)], capsys, workdir, f"data.path: {workdir / 'pq' / 'train'} holds no .parquet shards")


def test_nesterov_without_momentum(workdir: Path, digits_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _base(digits_slice)
    raw["indicators"].update(nesterov=True, momentum=0.0)
    config = _write(workdir / "bad.yaml", raw)
    _assert_one_line_exit_2(["indicators", "train", "--config", str(config)], capsys, workdir,
                            "indicators.nesterov: Nesterov needs momentum; set indicators.momentum > 0")
