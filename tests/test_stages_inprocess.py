"""The FP and joint indicator stages run in-process (layer 1, no Ray) on the digits demo data."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import PipelineConfig
from orchestrator.indicators import load_indicators, non_monotonic
from orchestrator.train.checkpoint import load_checkpoint
from orchestrator.train.stages import run_fp_stage, run_indicator_stage


def test_short_joint_training_on_digits_gives_step_sizes_that_grow_as_bits_fall(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({
        "name": "inproc", "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "input_size": 16},
        "data": {"path": str(tmp_path / "digits"), "demo": True, "batch_size": 32, "min_crop_scale": 0.6,
                 "hflip": False},
        "fp": {"epochs": 1, "train_fraction": 0.5},
        "indicators": {"bits": [6, 4, 3, 2], "epochs": 1, "train_fraction": 0.25},
    })
    fp_path = run_fp_stage(cfg)
    assert load_checkpoint(fp_path)["meta"]["arch"] == "resnet18"

    indicators_path = run_indicator_stage(cfg, fp_path)

    indicators = load_indicators(indicators_path)
    assert indicators.bits == [6, 4, 3, 2] and len(indicators.layers) == 19
    assert indicators.provenance["config_hash"] == cfg.config_hash()
    flagged = {(layer, kind) for layer, kind, _ in non_monotonic(indicators)}
    for kind in ("weight", "act"):
        monotone = [layer for layer in indicators.layers if (layer, kind) not in flagged]
        assert len(monotone) >= 0.8 * len(indicators.layers), f"{kind}: only {len(monotone)} monotone layers"
        growth = [getattr(indicators, kind)[layer][2] / getattr(indicators, kind)[layer][6] for layer in monotone]
        assert min(growth) > 1.5
    assert (cfg.run_dir / "joint.pt").is_file()
