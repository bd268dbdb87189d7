"""Indicators files: our JSON v1, the published JSON and pickle, the restricted unpickler, checks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.common.errors import UserError
from orchestrator.search.indicators import (
    INDICATORS_FORMAT,
    Indicators,
    check_layers,
    load_indicators,
    non_monotonic,
    save_indicators,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PUBLISHED = SHARED / "peers" / "limpq-official"
needs_shared = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="../shared/peers/limpq-official is absent")
_SCRIPT = Path(sys.executable).with_name("limpq")
LIMPQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())"]


def small_indicators() -> Indicators:
    # layer b: weight s(4) < s(5) and act s(3) < s(4) are the two non-monotonic entries
    return Indicators(
        model="resnet18",
        bits=[5, 4, 3],
        layers=["module.a", "module.b"],
        weight={"module.a": {"5": 0.1, "4": 0.2, "3": 0.4}, "module.b": {5: 0.3, 4: 0.25, 3: 0.5}},
        act={"module.a": {5: 0.01, 4: 0.02, 3: 0.03}, "module.b": {5: 0.1, 4: 0.2, 3: 0.15}},
        provenance={"run_id": "abc", "epochs": 3, "data": "digits"},
    )


def test_constructor_strips_ddp_prefix_and_normalises_bits():
    ind = small_indicators()
    assert ind.layers == ["a", "b"]
    assert set(ind.weight) == {"a", "b"} and ind.weight["a"] == {5: 0.1, 4: 0.2, 3: 0.4}


def test_json_v1_round_trip_is_atomic(tmp_path):
    ind = small_indicators()
    path = tmp_path / "out" / "indicators.json"
    save_indicators(ind, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["indicators.json"]  # no temporary file left
    raw = json.loads(path.read_text())
    assert raw["format"] == INDICATORS_FORMAT and raw["bits"] == [5, 4, 3]
    assert raw["layers"][0] == {"name": "a", "weight": {"5": 0.1, "4": 0.2, "3": 0.4},
                                "act": {"5": 0.01, "4": 0.02, "3": 0.03}}
    assert raw["provenance"] == {"run_id": "abc", "epochs": 3, "data": "digits"}
    assert load_indicators(path) == ind


def test_non_monotonic_entries_compare_neighbouring_candidates():
    assert non_monotonic(small_indicators()) == [("b", "weight", 4), ("b", "act", 3)]


def test_check_layers_lists_missing_and_extra_names():
    ind = small_indicators()
    check_layers(ind, ["a", "module.b"])
    with pytest.raises(UserError) as error:
        check_layers(ind, ["a", "c", "d"])
    message = str(error.value)
    assert "missing 2: c, d" in message and "extra 1: b" in message and "\n" not in message


@needs_shared
def test_published_pickle_and_json_give_identical_indicators():
    from_pickle = load_indicators(PUBLISHED / "importance_indicators_resnet50.pkl")
    from_json = load_indicators(PUBLISHED / "importance_indicators_resnet50.json")
    assert from_pickle == from_json
    assert len(from_pickle.layers) == 52 and from_pickle.layers[0] == "layer1.0.conv1"
    assert from_pickle.bits == [6, 5, 4, 3, 2]
    assert not any(name.startswith("module.") for name in from_pickle.weight)
    raw = json.loads((PUBLISHED / "importance_indicators_resnet50.json").read_text())
    assert from_json.weight["layer4.2.conv3"][5] == raw["weight"]["module.layer4.2.conv3"]["5"]


class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "executed"
    payload = {"weight": {"a": {"6": 0.1}}, "act": {"a": {"6": 0.1}}, "layer_name": ["a"],
               "x": _RunsACommand(f"touch {marker}")}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError) as error:
        load_indicators(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and f"{os.system.__module__}.system" in str(error.value)


def test_plain_data_pickle_loads(tmp_path):
    raw = {"weight": {"module.a": {"3": 0.2, "2": 0.3}}, "act": {"module.a": {"3": 0.1, "2": 0.4}},
           "layer_name": ["module.a"]}
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=2))
    ind = load_indicators(path)
    assert ind.layers == ["a"] and ind.bits == [3, 2] and ind.act["a"] == {3: 0.1, 2: 0.4}


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not valid JSON"),
    (b"\x80\x04garbage", "not a readable indicators pickle"),
    (json.dumps({"format": "something/v9", "layers": []}).encode(), "is not 'limpq-indicators/v1'"),
    (json.dumps({"weight": {"a": {"3": 0.1}}, "act": {"a": {"3": float("nan")}}}).encode(), "are finite numbers"),
    (json.dumps({"weight": {"a": {"3": 0.1}}, "act": {"a": {"2": 0.1}}}).encode(), "has bits [2], expected [3]"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_indicators(path)
    assert expected in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="indicators file not found"):
        load_indicators(tmp_path / "nope.json")


def test_indicators_show_flags_non_monotonic_entries(tmp_path):
    path = tmp_path / "ind.json"
    save_indicators(small_indicators(), path)
    result = subprocess.run([*LIMPQ, "indicators", "show", str(path)],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    row_b = next(line for line in lines if line.startswith("b "))
    assert row_b.count("*") == 2 and "0.25000*" in row_b and "0.15000*" in row_b
    assert lines[-1].startswith("2 non-monotonic entries (1 weight, 1 act)")
