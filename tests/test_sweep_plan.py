"""What the sweep plans and reports, without running it: trials per fine-tuning seed, budgets that
fine-tune a given policy file, what the stage keys hold, and the report's comparison of mixed and
uniform precision (which says what each comparison holds equal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.checks.stage_keys import stage_keys
from orchestrator.common.errors import UserError
from orchestrator.config.schema import PipelineConfig
from orchestrator.search.costs import cost_table
from orchestrator.search.policy import given_policy, uniform_baseline
from orchestrator.tracking.summary import format_report
from orchestrator.tracking.trials import trial_specs


def _config(tmp_path: Path, **finetune) -> PipelineConfig:
    policy = tmp_path / "mine.json"
    if not policy.exists():
        costs = cost_table("resnet18", 16, num_classes=10)
        policy.write_text(json.dumps(uniform_baseline(costs, 3).to_dict()))
    return PipelineConfig(model={"arch": "resnet18", "num_classes": 10, "input_size": 16},
                          indicators={"bits": [4, 3, 2]},
                          search={"budgets": [{"target_wbits": 3, "target_abits": 3}, {"policy": str(policy)}]},
                          finetune={"baselines": [2], **finetune})


def test_every_policy_is_fine_tuned_once_per_seed_under_its_own_label(tmp_path: Path) -> None:
    specs = trial_specs(_config(tmp_path, seeds=3))
    assert [(s.label, s.kind, s.seed, s.policy_label) for s in specs[:4]] == [
        ("W3A3", "mpq", 0, "W3A3"), ("W3A3-seed1", "mpq", 1, "W3A3"), ("W3A3-seed2", "mpq", 2, "W3A3"),
        ("policy-mine", "given", 0, "policy-mine")]
    assert [s.label for s in specs[-3:]] == ["uniform-W2A2", "uniform-W2A2-seed1", "uniform-W2A2-seed2"]
    # one-shot scores have no seed to vary: one trial per policy
    assert len(trial_specs(_config(tmp_path, seeds=3, epochs=0))) == 3


def test_seeds_and_the_given_policy_file_key_the_sweep(tmp_path: Path) -> None:
    fingerprint = {"files": 1}
    one, three = (stage_keys(_config(tmp_path, seeds=n), fingerprint) for n in (1, 3))
    assert one.fp == three.fp and one.indicators == three.indicators and one.sweep != three.sweep
    before = stage_keys(_config(tmp_path), fingerprint).sweep
    document = json.loads((tmp_path / "mine.json").read_text())
    document["layers"][0]["wbits"] = 2
    (tmp_path / "mine.json").write_text(json.dumps(document))
    assert stage_keys(_config(tmp_path), fingerprint).sweep != before  # the file's content, not its name


def test_a_given_policy_is_checked_against_the_model_and_costed_here(tmp_path: Path) -> None:
    costs = cost_table("resnet18", 16, num_classes=10)
    document = uniform_baseline(costs, 3).to_dict()
    document["size_mb"] = 0.001  # a file's totals are never trusted
    path = tmp_path / "p.json"
    path.write_text(json.dumps(document))
    policy = given_policy(path, costs, [4, 3, 2], label="mine")
    assert policy.totals == uniform_baseline(costs, 3).totals and policy.label == "mine"
    with pytest.raises(UserError, match=r"bit-widths \[3\] are not among indicators.bits \[4, 2\]"):
        given_policy(path, costs, [4, 2])


def _row(label: str, kind: str, bitops: float, size: float, top1: float, seed: int = 0) -> dict:
    return {"budget": label + (f"-seed{seed}" if seed else ""), "policy": label, "seed": float(seed), "kind": kind,
            "status": "ok", "bitops_g": bitops, "size_mb": size, "top1": top1, "onnx_top1": top1,
            "onnx_agreement": 1.0}


def test_the_report_gives_mean_and_spread_and_says_what_each_comparison_holds_equal() -> None:
    rows = [_row("W3A3", "mpq", 0.3114, 2.756, 0.97), _row("W3A3", "mpq", 0.3114, 2.756, 0.99, seed=1),
            _row("uniform-W3A3", "uniform", 0.3114, 4.004, 0.96), _row("uniform-W3A3", "uniform", 0.3114, 4.004, 0.96, 1),
            _row("uniform-W2A2", "uniform", 0.1384, 2.674, 0.90), _row("uniform-W2A2", "uniform", 0.1384, 2.674, 0.92, 1),
            _row("policy-r0", "given", 0.31, 3.1, 0.5)]
    report = format_report(rows)
    assert "98.0 ± 1.4" in report and "2/2" in report
    [line] = [line for line in report.splitlines() if line.startswith("  W3A3")]
    # the same uniform model is the cheapest of no lower BitOps and of no smaller size: one line, both costs
    assert "vs uniform-W3A3 96.0 ± 0.0 (+2.0 ± 1.0, within two standard errors over the seeds: no difference" in line
    assert "GBitOps 0.3114 vs 0.3114 (equal)" in line and "size 2.756 vs 4.004 MB (uniform 1.45x)" in line
    assert "policy-r0" not in "".join(line for line in report.splitlines() if line.startswith("  "))


def test_the_report_names_a_winner_only_beyond_two_standard_errors_over_seeds() -> None:
    def line(mixed: tuple[float, ...], uniform: tuple[float, ...]) -> str:
        rows = [_row("W3A3", "mpq", 0.3114, 2.756, top1, seed) for seed, top1 in enumerate(mixed)]
        rows += [_row("uniform-W3A3", "uniform", 0.3114, 4.004, top1, seed) for seed, top1 in enumerate(uniform)]
        return next(line for line in format_report(rows).splitlines() if line.startswith("  W3A3"))

    assert "(+2.5 ± 0.5, mixed ahead beyond two standard errors)" in line((0.97, 0.98), (0.95, 0.95))
    assert "(-2.5 ± 0.5, uniform ahead beyond two standard errors)" in line((0.95, 0.95), (0.97, 0.98))
    assert "(+1.0 ± 0.7, within two standard errors" in line((0.96, 0.97), (0.95, 0.96))
    assert "(+3.0, one seed: with finetune.seeds 2 or more" in line((0.98,), (0.95,))


def test_a_sweep_without_uniform_baselines_prints_no_comparison() -> None:
    assert "Mixed vs uniform" not in format_report([_row("W3A3", "mpq", 0.3114, 2.756, 0.97)])
