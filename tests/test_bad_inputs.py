"""Bad inputs a user gives, across every command, each refused before any work: exit status 2, one
line on stderr naming the key, file or value and the fix, no traceback, nothing created in the
working directory, within 60 s. Unreachable services are simulated on 127.0.0.1 only: an unused
port, or a server that accepts connections and never answers.

The cases of issue 19 are here; the config checks that already held are in test_preflight.py."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import torch
import yaml
from cluster import free_port
from data_fixtures import write_tiny_folder

from orchestrator.cli import main
from orchestrator.config.schema import PipelineConfig
from orchestrator.data.convert import folder_to_parquet
from orchestrator.search.indicators import Indicators, save_indicators

LEFT_BY_A_RUN = ("mlflow.db", "mlruns", "mlartifacts", "runs", "demo_data", "out")


@pytest.fixture(scope="module")
def black_hole() -> Iterator[str]:
    """host:port of a server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in accepted:
        connection.close()


@dataclass
class Case:
    """`argv` run in an empty working directory after `setup(workdir, env)` prepared files and
    environment; stderr must be one line holding `expected`."""

    id: str
    argv: list[str]
    expected: str
    setup: Callable[[Path, dict[str, str]], None] = lambda workdir, env: None
    env: dict[str, str] = field(default_factory=dict)


def _config(workdir: Path, digits: Path, **sections) -> None:
    """workdir/config.yaml: the digits slice at 16 px, one budget, plus `sections` (keys replaced)."""
    raw = {
        "name": "bad", "output_dir": "runs",
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(digits), "batch_size": 8},
        "fp": {"epochs": 0},
        "indicators": {"bits": [4, 3, 2], "epochs": 1},
        "search": {"budgets": [{"target_wbits": 3, "target_abits": 3}]},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    (workdir / "config.yaml").write_text(yaml.safe_dump(raw))


def _policy(workdir: Path, **changes) -> None:
    """workdir/policy.json: a uniform W3A3 policy of resnet18 at 16 px, with `changes`."""
    from orchestrator.search.costs import cost_table
    from orchestrator.search.policy import uniform_baseline

    document = uniform_baseline(cost_table("resnet18", 16, num_classes=10), 3).to_dict()
    layers = changes.pop("layers", None)
    if layers is not None:
        document["layers"][0].update(layers)
    document.update(changes)
    (workdir / "policy.json").write_text(json.dumps(document))


def _indicators(workdir: Path) -> None:
    names = [f"layer{i}" for i in range(3)]
    steps = {name: {4: 0.1, 2: 0.4} for name in names}
    save_indicators(Indicators("resnet18", [4, 2], names, steps, steps), workdir / "ind.json")


def _unused_port() -> int:
    return free_port()


def _malicious_checkpoint(workdir: Path) -> None:
    class RunsACommand:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"model": RunsACommand()}, workdir / "fp.pt")


def _parquet_with_an_empty_class(workdir: Path) -> None:
    write_tiny_folder(workdir / "folder", classes=3, per_class=8)
    for image in (workdir / "folder" / "train" / "c1").iterdir():
        image.unlink()
    (workdir / "folder" / "train" / "c1").rmdir()
    for image in (workdir / "folder" / "val" / "c1").iterdir():
        image.unlink()
    (workdir / "folder" / "val" / "c1").rmdir()
    folder_to_parquet(workdir / "folder", workdir / "pq", shard_size=10)
    import pyarrow.parquet as pq

    # renumber the labels 0, 2 (no row of class 1), as a dataset built by other tools might
    for split in ("train", "val"):
        for shard in (workdir / "pq" / split).glob("*.parquet"):
            table = pq.read_table(shard)
            labels = [2 if label == 1 else label for label in table.column("label").to_pylist()]
            pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                            __import__("pyarrow").array(labels)), shard)


def _module(workdir: Path, name: str, source: str) -> None:
    """workdir/<name>.py: a user's model module (torch and nn imported)."""
    (workdir / f"{name}.py").write_text("import torch\nfrom torch import nn\n\n" + source)


LINEAR_HEAD = """
class Head(nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.fc = nn.Linear(3, outputs)

    def forward(self, x):
        return {result}
"""


def _head_module(workdir: Path, name: str, result: str, outputs: str = "num_classes") -> None:
    """A model whose forward returns `result` (an expression of x and self.fc), built by name:build."""
    _module(workdir, name, LINEAR_HEAD.format(result=result) + f"\n\ndef build(num_classes):\n    return Head({outputs})\n")


def _budgets_config(workdir: Path, digits: Path, count: int) -> None:
    """workdir/config.yaml with `count` budgets in block style, written without PyYAML (it is big)."""
    _config(workdir, digits, search={"budgets": []})
    text = (workdir / "config.yaml").read_text()
    budgets = "".join(f"  - bitops_g: {0.05 + index * 1e-7:.7f}\n" for index in range(count))
    (workdir / "config.yaml").write_text(text.replace("  budgets: []\n", "  budgets:\n" + budgets))


def _cases(digits: Path, black_hole: str) -> list[Case]:
    def config(**sections):
        return lambda workdir, env: _config(workdir, digits, **sections)

    return [
        # services that do not answer
        Case("mlflow server down", ["config", "validate", "config.yaml"],
             "mlflow.tracking_uri: no MLflow server answers at http://127.0.0.1:",
             config(mlflow={"tracking_uri": f"http://127.0.0.1:{_unused_port()}"})),
        Case("mlflow server silent", ["run", "--config", "config.yaml"],
             f"mlflow.tracking_uri: no MLflow server answers at http://{black_hole}",
             config(mlflow={"tracking_uri": f"http://{black_hole}"})),
        Case("ray address down", ["run", "--config", "config.yaml"], "ray.address: no Ray cluster answers at 127.0.0.1:",
             config(ray={"address": f"127.0.0.1:{_unused_port()}"})),
        Case("RAY_ADDRESS down", ["indicators", "train", "--config", "config.yaml"],
             "RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:", config(),
             env={"RAY_ADDRESS": f"127.0.0.1:{_unused_port()}"}),
        Case("ray address not an address", ["config", "validate", "config.yaml"],
             "ray.address: 'my-cluster' is not a Ray cluster address", config(ray={"address": "my-cluster"})),
        Case("s3 endpoint silent", ["config", "validate", "config.yaml"],
             "data.path: no answer from s3://bucket/digits within 20 s; check the network, AWS_ENDPOINT_URL",
             config(data={"path": "s3://bucket/digits"}),
             env={"AWS_ENDPOINT_URL": f"http://{black_hole}", "AWS_ACCESS_KEY_ID": "testing",
                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}),
        # budgets no policy can meet
        Case("average bits below every candidate", ["config", "validate", "config.yaml"],
             "search.budgets[0] (avgW1): average weight bits 1 is below the minimum 2",
             config(search={"budgets": [{"avg_wbits": 1.0}]})),
        Case("compression ratio too high", ["run", "--config", "config.yaml"],
             "search.budgets[0] (CR1000): compression ratio 1000 is above the maximum",
             config(search={"budgets": [{"compression_ratio": 1000}]})),
        Case("BitOps below the lowest bits", ["run", "--config", "config.yaml"],
             "search.budgets[0] (G1e-06): BitOps budget 1e-06 G is below the minimum",
             config(search={"budgets": [{"bitops_g": 1e-6}]})),
        Case("jointly infeasible", ["run", "--config", "config.yaml"], "search.budgets[1] (",
             config(search={"budgets": [{"target_wbits": 4, "target_abits": 4},
                                        {"target_wbits": 2, "target_abits": 2, "avg_abits": 2.5, "size_mb": 1e-3}]})),
        Case("no budget", ["run", "--config", "config.yaml"], "search.budgets: empty", config(search={"budgets": []})),
        Case("labels one alias", ["config", "validate", "config.yaml"],
             "search.budgets[1]: label 'small' and 'Small' of search.budgets[0] are one registry alias",
             config(search={"budgets": [{"name": "Small", "bitops_g": 0.05}, {"name": "small", "bitops_g": 0.06}]})),
        Case("infinite budget", ["config", "validate", "config.yaml"], "search.budgets.0.bitops_g: Input should be a finite",
             config(search={"budgets": [{"bitops_g": float("inf")}]})),
        # resources
        Case("more CPUs than the machine", ["run", "--config", "config.yaml"],
             "ray.cpus_per_worker: 1 worker(s) x 10000 CPUs need 10000 CPUs, but the local Ray runs on this machine's",
             config(ray={"cpus_per_worker": 10000})),
        Case("a worker without images", ["run", "--config", "config.yaml"],
             "ray.num_workers: 2 workers share the",
             config(ray={"num_workers": 2, "cpus_per_worker": 0.5}, data={"batch_size": 1},
                    indicators={"train_fraction": 0.013})),
        # files
        Case("a directory as config", ["run", "--config", "."], ".: is a directory; give the config file's path"),
        Case("config missing", ["config", "validate", "nothing.yaml"], "nothing.yaml: config file not found"),
        Case("a directory as indicators", ["search", "--indicators", ".", "--bitops-budget", "1"],
             ".: is a directory; give the indicators file's path"),
        Case("indicators json malformed", ["indicators", "show", "ind.json"], "ind.json: not valid JSON",
             lambda workdir, env: (workdir / "ind.json").write_text("[1, 2,")),
        Case("a directory as fp checkpoint", ["config", "validate", "config.yaml"],
             "fp.checkpoint: .: is a directory; give the torch checkpoint's path",
             config(fp={"source": "checkpoint", "checkpoint": "."})),
        Case("a checkpoint that runs code", ["config", "validate", "config.yaml"],
             "fp.checkpoint: fp.pt: refused to load: it holds Python objects (posix.system)",
             lambda workdir, env: (_malicious_checkpoint(workdir),
                                   _config(workdir, digits, fp={"source": "checkpoint", "checkpoint": "fp.pt"}))),
        Case("parquet with an empty class", ["config", "validate", "config.yaml"], "has no row of class 1",
             lambda workdir, env: (_parquet_with_an_empty_class(workdir),
                                   _config(workdir, digits, data={"path": "pq", "format": "parquet"},
                                           model={"num_classes": 3}))),
        # limpq search
        Case("search output is a directory", ["search", "--indicators", "ind.json", "--model", "resnet18",
                                              "--bitops-budget", "1", "--output", "."],
             "--output: ", lambda workdir, env: _indicators(workdir)),
        Case("search out-dir under a file", ["search", "--indicators", "ind.json", "--sweep-bitops", "1", "2",
                                             "--out-dir", "ind.json/sweep"],
             "--out-dir: cannot create directory", lambda workdir, env: _indicators(workdir)),
        Case("a huge sweep", ["search", "--indicators", "ind.json", "--model", "resnet18", "--sweep-bitops",
                              "0.1:0.3:100000000", "--out-dir", "out"],
             "the sweep asks for 100,000,000 budgets", lambda workdir, env: _indicators(workdir)),
        Case("an infinite budget", ["search", "--indicators", "ind.json", "--bitops-budget", "inf"],
             "--bitops-budget: Input should be a finite number", lambda workdir, env: _indicators(workdir)),
        Case("no classes", ["search", "--indicators", "ind.json", "--bitops-budget", "1", "--num-classes", "0"],
             "argument --num-classes: 0 is below 2"),
        Case("search model kwargs not JSON", ["search", "--indicators", "ind.json", "--bitops-budget", "1",
                                              "--model-kwargs", "{depth: 3"],
             "--model-kwargs: not valid JSON", lambda workdir, env: _indicators(workdir)),
        # limpq model info / check
        Case("model kwargs not an object", ["model", "info", "--arch", "resnet18", "--input-size", "32",
                                            "--model-kwargs", "[3]"], "--model-kwargs: give a JSON object"),
        Case("model kwargs the builder refuses", ["model", "info", "--arch", "resnet18", "--input-size", "32",
                                                  "--model-kwargs", '{"depth": 3}'],
             "model.kwargs: torchvision's resnet18 refuses them (ResNet.__init__() got an unexpected keyword"),
        Case("model info of an unknown model", ["model", "info", "--arch", "resnet19", "--input-size", "32"],
             "model.arch: unknown torchvision model 'resnet19'"),
        Case("model info at a size the model refuses", ["model", "info", "--arch", "vit_b_16", "--input-size", "32"],
             "--input-size: vit_b_16 does not run at 32x32 (AssertionError: Wrong image height!"),
        Case("model info at a tiny size", ["model", "info", "--arch", "resnet18", "--input-size", "4"],
             "argument --input-size: 4 is below 8"),
        Case("model check with one class", ["model", "check", "--arch", "resnet18", "--input-size", "32",
                                            "--num-classes", "1"], "argument --num-classes: 1 is below 2"),
        Case("model check at 9 bits", ["model", "check", "--arch", "resnet18", "--input-size", "32", "--bits", "9"],
             "--bits: bit-width 9 outside 2..8"),
        # limpq data to-parquet
        Case("to-parquet into a file", ["data", "to-parquet", "src", "target"], "DST: ",
             lambda workdir, env: (write_tiny_folder(workdir / "src", classes=2, per_class=2),
                                   (workdir / "target").write_text("a file"))),
        Case("to-parquet under a file", ["data", "to-parquet", "src", "target/pq"], "DST: cannot create directory",
             lambda workdir, env: (write_tiny_folder(workdir / "src", classes=2, per_class=2),
                                   (workdir / "target").write_text("a file"))),
        Case("to-parquet into /proc", ["data", "to-parquet", "src", "/proc/limpq-pq"], "/proc/",
             lambda workdir, env: write_tiny_folder(workdir / "src", classes=2, per_class=2)),
        # limpq submit
        Case("submit to not an address", ["submit", "--address", "notaurl", "--", "echo", "hi"],
             "--address: 'notaurl' is not a Ray job API address"),
        # limpq export: the store checked first, nothing overwritten or written into it
        Case("export from a silent server", ["export", "--model-uri", "models:/m@best-top1", "--out", "m.onnx",
                                             "--tracking-uri", f"http://{black_hole}"],
             f"--tracking-uri: no MLflow server answers at http://{black_hole}"),
        Case("export from a file that is not a store", ["export", "--model-uri", "models:/m@best-top1", "--out",
                                                        "m.onnx", "--tracking-uri", "sqlite:///notes.db"],
             "--tracking-uri: notes.db is an empty file, not an MLflow database",
             lambda workdir, env: (workdir / "notes.db").write_text("")),
        Case("export over a config file", ["export", "--model-uri", "models:/m@best-top1", "--out", "config.yaml"],
             "--out config.yaml: exists and is not an ONNX file", config()),
        Case("export at opset 0", ["export", "--model-uri", "models:/m@best-top1", "--out", "m.onnx", "--opset", "0"],
             "--opset 0: limpq writes ONNX opset 21 (the first with INT4) to 23"),
        Case("export a huge batch", ["export", "--model-uri", "models:/m@best-top1", "--out", "m.onnx", "--batch",
                                     "1000000"], "argument --batch: expected 'dynamic' or an integer from 1 to 1024"),
        # limpq evaluate: policies checked before the joint model is looked up
        Case("evaluate another model's policy", ["evaluate", "--config", "config.yaml", "--policy", "policy.json"],
             "policy.json: a policy for model resnet50, but the config's model.arch is resnet18",
             lambda workdir, env: (_config(workdir, digits), _policy(workdir, model="resnet50"))),
        Case("evaluate bits as text", ["evaluate", "--config", "config.yaml", "--policy", "policy.json"],
             "wbits is '3', not an integer bit-width",
             lambda workdir, env: (_config(workdir, digits), _policy(workdir, layers={"wbits": "3"}))),
        Case("evaluate another input size", ["evaluate", "--config", "config.yaml", "--policy", "policy.json"],
             "policy.json: a policy searched at input size 224, but the config's model.input_size is 16",
             lambda workdir, env: (_config(workdir, digits), _policy(workdir, input_size=224))),
        # a budget that fine-tunes a given policy file: checked like `limpq evaluate`'s, before Ray starts
        Case("budget with a policy and a constraint", ["config", "validate", "config.yaml"],
             "policy is fine-tuned as given, so bitops_g would do nothing; drop it or the policy",
             lambda workdir, env: (_policy(workdir), _config(workdir, digits, search={"budgets": [
                 {"policy": "policy.json", "bitops_g": 0.1}]}))),
        Case("budget with another model's policy", ["config", "validate", "config.yaml"],
             "search.budgets[0].policy: ",
             lambda workdir, env: (_policy(workdir, model="resnet50"), _config(workdir, digits, search={"budgets": [
                 {"policy": "policy.json"}]}))),
        Case("budget with a policy at untrained bits", ["config", "validate", "config.yaml"],
             "bit-widths [6] are not among indicators.bits [4, 3, 2]",
             lambda workdir, env: (_policy(workdir, layers={"wbits": 6}), _config(workdir, digits, search={"budgets": [
                 {"policy": "policy.json"}]}))),
        Case("budget with a policy missing a layer", ["config", "validate", "config.yaml"],
             "lacks layer layer1.0.conv1 of resnet18",
             lambda workdir, env: (_policy(workdir, layers={"name": "nonsense"}), _config(
                 workdir, digits, search={"budgets": [{"policy": "policy.json"}]}))),
        Case("no fine-tuning seed", ["config", "validate", "config.yaml"],
             "finetune.seeds: Input should be greater than or equal to 1",
             lambda workdir, env: _config(workdir, digits, finetune={"seeds": 0})),
        Case("budget with a missing policy file", ["config", "validate", "config.yaml"],
             "search.budgets[0].policy: ",
             lambda workdir, env: _config(workdir, digits, search={"budgets": [{"policy": "absent.json"}]})),
        Case("evaluate a bit-width not trained", ["evaluate", "--config", "config.yaml", "--uniform", "8"],
             "uniform-W8A8: layer layer1.0.conv1 asks for W8A8", lambda workdir, env: _config(workdir, digits)),
        # issue 26: tracking stores, checked before work and never written into
        Case("tracking store an empty file", ["config", "validate", "config.yaml"],
             "mlflow.tracking_uri: empty.db is an empty file, not an MLflow database",
             lambda workdir, env: ((workdir / "empty.db").touch(),
                                   _config(workdir, digits, mlflow={"tracking_uri": "sqlite:///empty.db"}))),
        Case("tracking store a text file", ["evaluate", "--config", "config.yaml", "--uniform", "3"],
             "MLFLOW_TRACKING_URI: notes.txt is not an SQLite database, not an MLflow database",
             lambda workdir, env: ((workdir / "notes.txt").write_text("my notes\n"), _config(workdir, digits)),
             env={"MLFLOW_TRACKING_URI": "sqlite:///notes.txt"}),
        Case("tracking store another program's database", ["run", "--config", "config.yaml"],
             "mlflow.tracking_uri: other.db is an SQLite database but not an MLflow store",
             lambda workdir, env: (__import__("sqlite3").connect(workdir / "other.db").execute(
                 "create table accounts (id integer)").connection.commit(),
                 _config(workdir, digits, mlflow={"tracking_uri": "sqlite:///other.db"}))),
        Case("tracking uri not a store", ["indicators", "train", "--config", "config.yaml"],
             "mlflow.tracking_uri: 'ftp://127.0.0.1/mlflow' is not an MLflow tracking store",
             config(mlflow={"tracking_uri": "ftp://127.0.0.1/mlflow"})),
        Case("tracking store in a missing directory", ["config", "validate", "config.yaml"],
             "mlflow.tracking_uri: the directory nowhere of the new MLflow database mlflow.db does not exist",
             config(mlflow={"tracking_uri": "sqlite:///nowhere/mlflow.db"})),
        # the Ray address answers, but not as Ray
        Case("ray address not Ray", ["run", "--config", "config.yaml"],
             f"ray.address: {black_hole} answers, but not as a Ray cluster (no gRPC answer within",
             config(ray={"address": black_hole})),
        # the trial forward: one input, one (N, num_classes) tensor, Conv2d/Linear layers
        Case("model returns a tuple", ["config", "validate", "config.yaml"],
             "model.arch: Head.forward returns a tuple, not one logits tensor of shape (N, model.num_classes)",
             lambda workdir, env: (_head_module(workdir, "tuple_head", "self.fc(x.mean((2, 3))), x"),
                                   _config(workdir, digits, model={"arch": "tuple_head:build"},
                                           fp={"epochs": 1}))),
        Case("model returns a dict", ["run", "--config", "config.yaml"],
             "model.arch: Head.forward returns a dict",
             lambda workdir, env: (_head_module(workdir, "dict_head", "{'logits': self.fc(x.mean((2, 3)))}"),
                                   _config(workdir, digits, model={"arch": "dict_head:build"}))),
        Case("model returns 3-D logits", ["config", "validate", "config.yaml"],
             "model.arch: Head.forward returns a tensor of shape (1, 16, 10) for one image",
             lambda workdir, env: (_head_module(workdir, "map_head", "self.fc(x.mean(3).transpose(1, 2))"),
                                   _config(workdir, digits, model={"arch": "map_head:build"}))),
        Case("model returns 3 logits for 10 classes", ["run", "--config", "config.yaml"],
             "model.num_classes: 10, but Head.forward returns 3 logits per image; set model.num_classes: 3",
             lambda workdir, env: (_head_module(workdir, "three_head", "self.fc(x.mean((2, 3)))", outputs="3"),
                                   _config(workdir, digits, model={"arch": "three_head:build"}))),
        Case("model forward takes two inputs", ["model", "info", "--arch", "two_inputs:build", "--input-size", "16"],
             "model.arch: Pair.forward takes 2 inputs (x, mask), but the pipeline passes one image batch",
             lambda workdir, env: _module(workdir, "two_inputs", "class Pair(nn.Module):\n    def __init__(self):\n"
                                          "        super().__init__()\n        self.fc = nn.Linear(3, 10)\n\n"
                                          "    def forward(self, x, mask):\n        return self.fc(x.mean((2, 3)) * mask)\n"
                                          "\n\ndef build(num_classes):\n    return Pair()\n")),
        Case("model without Conv2d or Linear: check", ["model", "check", "--arch", "no_layers:build", "--input-size",
                                                       "16", "--num-classes", "3"],
             "model.arch: Flatten runs no Conv2d or Linear module, so nothing of it can be quantized",
             lambda workdir, env: _module(workdir, "no_layers", "def build(num_classes):\n    return nn.Flatten()\n")),
        Case("model without Conv2d or Linear: info", ["model", "info", "--arch", "no_layers_info:build",
                                                      "--input-size", "16"],
             "model.arch: Sequential runs no Conv2d or Linear module",
             lambda workdir, env: _module(workdir, "no_layers_info", "def build(num_classes):\n    return "
                                          "nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")),
        Case("model kwargs repeat num_classes", ["config", "validate", "config.yaml"],
             "model.kwargs: 'num_classes' is set by model.num_classes (--num-classes); remove it from model.kwargs",
             config(model={"kwargs": {"num_classes": 10}})),
        Case("model kwargs repeat num_classes on the command line", ["search", "--indicators", "ind.json",
                                                                     "--model", "resnet18", "--bitops-budget", "1",
                                                                     "--model-kwargs", '{"num_classes": 5}'],
             "model.kwargs: 'num_classes' is set by model.num_classes", lambda workdir, env: _indicators(workdir)),
        # classes of the dataset against model.num_classes
        Case("1000 classes on 10-class data", ["config", "validate", "config.yaml"],
             "model.num_classes: 1000, but ", config(model={"num_classes": 1000})),
        Case("a dataset of one class", ["run", "--config", "config.yaml"], "holds one class, and a classifier needs",
             lambda workdir, env: (write_tiny_folder(workdir / "one", classes=1, per_class=8),
                                   _config(workdir, digits, data={"path": "one", "batch_size": 2},
                                           model={"num_classes": 2}))),
        # limits stated in the error, before the file is parsed
        Case("more budgets than a config holds", ["config", "validate", "config.yaml"],
             "search.budgets: 10,001 budgets, above the limit of 10,000 per config",
             lambda workdir, env: _budgets_config(workdir, digits, 10_001)),
        Case("a config file of megabytes", ["run", "--config", "config.yaml"],
             "config.yaml: 2.7 MiB, above the limit of 2 MiB for a config file",
             lambda workdir, env: _budgets_config(workdir, digits, 120_000)),
        # a user's module that exits, parses the command line or shadows the standard library
        Case("model module exits at import", ["config", "validate", "config.yaml"],
             "model.arch: importing exits_at_import raised SystemExit('no GPU here') (at exits_at_import.py:5)",
             lambda workdir, env: (_module(workdir, "exits_at_import", "import sys\nsys.exit('no GPU here')\n"),
                                   _config(workdir, digits, model={"arch": "exits_at_import:build"}))),
        Case("model module parses arguments at import", ["model", "info", "--arch", "parses_argv:build",
                                                         "--input-size", "16"],
             "model.arch: importing parses_argv raised SystemExit(2) (at parses_argv.py:8) after printing "
             "'parses_argv: error: the following arguments are required: --data'",
             lambda workdir, env: _module(workdir, "parses_argv", "import argparse\nprint('building')\n"
                                          "parser = argparse.ArgumentParser()\nparser.add_argument('--data', "
                                          "required=True)\nparser.parse_args()\n")),
        Case("model module named like the standard library", ["config", "validate", "config.yaml"],
             "model.arch: 'random' is a module of Python's standard library, which Python imports instead",
             lambda workdir, env: (_head_module(workdir, "random", "self.fc(x.mean((2, 3)))"),
                                   _config(workdir, digits, model={"arch": "random:build"}))),
        # --set in the notation the errors print
        Case("--set with a list index in brackets", ["config", "validate", "config.yaml", "--set",
                                                     "search.budgets[0].bitops_g=-1"],
             "--set: search.budgets.0.bitops_g: Input should be greater than 0", lambda workdir, env: _config(
                 workdir, digits)),
    ]


CASE_IDS = [case.id for case in _cases(Path("x"), "127.0.0.1:1")]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_is_one_line_before_any_work(index: int, digits_slice: Path, black_hole: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    case = _cases(digits_slice, black_hole)[index]
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a user's module's __pycache__ is Python's, not ours
    case.setup(workdir, case.env)
    before = {path.name for path in workdir.iterdir()}
    contents = {path.name: path.read_bytes() for path in workdir.iterdir() if path.is_file()}
    capsys.readouterr()
    started = time.monotonic()
    try:
        code = main(case.argv)
    except SystemExit as usage_error:  # argparse's own errors
        code = usage_error.code
    seconds = time.monotonic() - started
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert case.expected in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert seconds < 60
    assert not ray.is_initialized()
    assert {path.name for path in workdir.iterdir()} - before == set(), "the command created files"
    assert not [name for name in LEFT_BY_A_RUN if (workdir / name).exists() and name not in before]
    assert {name: (workdir / name).read_bytes() for name in contents} == contents, "the command changed a file"


def test_config_with_numerics_on_is_another_stage(digits_slice: Path) -> None:
    """training.bf16 changes what training computes: its stages are not the bf16-off ones (resources
    and training.compile, the same numbers to float tolerance, are)."""
    from orchestrator.data.layout import index_dataset
    from orchestrator.checks.stage_keys import stage_keys

    def keys(**sections):
        cfg = PipelineConfig.model_validate({"data": {"path": str(digits_slice)}, **sections})
        return stage_keys(cfg, index_dataset(cfg.data).fingerprint)

    plain = keys()
    assert keys(ray={"num_workers": 4, "cpus_per_worker": 2}) == plain
    assert keys(training={"compile": "off"}) == keys(training={"compile": "on"}) == plain
    bf16 = keys(training={"bf16": True})
    assert bf16.fp != plain.fp and bf16.indicators != plain.indicators and bf16.sweep != plain.sweep
