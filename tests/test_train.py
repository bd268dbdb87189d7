"""Training checkpoints and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.common.errors import UserError
from orchestrator.models.info import build_model
from orchestrator.train.checkpoint import (
    load_checkpoint,
    restore_model,
    save_checkpoint,
)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt: checkpoint file not found"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a zip file")
    with pytest.raises(UserError, match="corrupt.pt: not a readable torch checkpoint"):
        load_checkpoint(corrupt)
    saved = save_checkpoint(tmp_path / "r18.pt", build_model("resnet18", 10))
    with pytest.raises(UserError, match=r"r18.pt: checkpoint does not match the model \(.*shape mismatch: fc.weight"):
        restore_model(build_model("resnet18", 4), load_checkpoint(saved)["model"], saved)
    with pytest.raises(UserError, match="r18.pt: checkpoint does not match the model.*missing: layer1.2.conv1.weight"):
        restore_model(build_model("resnet34", 10), load_checkpoint(saved)["model"], saved)


def test_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Exploit()}, evil, _use_new_zipfile_serialization=True)
    with pytest.raises(UserError, match=r"evil.pt: refused to load: it holds Python objects \(getattr\)"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_dropout_masks_are_a_function_of_seed_stage_rank_and_epoch() -> None:
    """A Ray worker's global generator holds whatever earlier work left in it (data tasks seed it per
    image): each epoch reseeds it, so dropout repeats whatever ran before and differs where it should."""
    from orchestrator.train.stages import seed_epoch

    dropout, ones = torch.nn.Dropout(0.5), torch.ones(4096)

    def masks(*where) -> torch.Tensor:
        seed_epoch(*where)
        return dropout(ones)

    first = masks(0, "indicators", 0, 1)
    torch.manual_seed(12345)  # another task's seed and draws in between
    torch.rand(77)
    assert torch.equal(masks(0, "indicators", 0, 1), first)
    for other in ((1, "indicators", 0, 1), (0, "finetune", 0, 1), (0, "indicators", 1, 1), (0, "indicators", 0, 2)):
        assert not torch.equal(masks(*other), first), other
