"""In-process training loop: exact resume, checkpoints and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from orchestrator.config import PipelineConfig
from orchestrator.errors import UserError
from orchestrator.modelinfo import build_model
from orchestrator.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from orchestrator.train.loop import fit, steps_per_epoch
from orchestrator.train.stages import joint_model, joint_training


class FlippingImages(Dataset):
    """Random images whose augmentation draws from torch's global RNG, as torchvision transforms do."""

    def __init__(self, count: int = 36, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(3)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 4, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])


def _config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "resume", "output_dir": str(tmp_path), "seed": 11,
        "model": {"arch": "resnet18", "num_classes": 4, "input_size": 16},
        "data": {"demo": True, "batch_size": 8},
        "indicators": {"bits": [4, 2], "epochs": 2, "lr": 0.05},
    })


def _train(cfg: PipelineConfig, checkpoint: Path, stop_after_steps: int | None = None):
    torch.manual_seed(0)
    model = joint_model(cfg, build_model("resnet18", 4))
    data = FlippingImages()
    per_epoch = steps_per_epoch(len(data), cfg.data.batch_size)
    training = joint_training(cfg, model, per_epoch)
    result = fit(model, data, cfg.indicators, stage="indicators", step_fn=training.step,
                 optimizer=training.optimizer, scheduler=training.scheduler, batch_size=cfg.data.batch_size,
                 seed=cfg.seed, checkpoint_path=checkpoint, policy_rng=training.policy_rng,
                 stop_after_steps=stop_after_steps)
    return model, training, result


def test_resume_from_mid_epoch_checkpoint_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    straight, straight_training, result = _train(cfg, tmp_path / "straight.pt")
    assert result.finished and len(result.history) == 2

    _, _, first = _train(cfg, tmp_path / "resumed.pt", stop_after_steps=3)  # 4 steps per epoch: stops mid-epoch 0
    assert not first.finished
    assert load_checkpoint(tmp_path / "resumed.pt")["step"] == 3
    torch.manual_seed(12345)  # the resumed process starts from other RNG states; the checkpoint restores them
    resumed, resumed_training, second = _train(cfg, tmp_path / "resumed.pt")
    assert second.finished

    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert straight_training.optimizer.state_dict()["state"].keys() == resumed_training.optimizer.state_dict()["state"].keys()
    assert straight_training.scheduler.last_epoch == resumed_training.scheduler.last_epoch == 8
    assert result.history[-1]["loss_w2"] == pytest.approx(second.history[-1]["loss_w2"], abs=0, rel=1e-12)


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
    with pytest.raises(UserError, match="evil.pt: not a readable torch checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
